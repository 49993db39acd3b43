"""What the numbers mean: accuracy, precision/recall/F1, exact match, perplexity, ROUGE and BLEU.

Plain Python over lists of strings or labels, no dependencies; `jaxft.metrics` re-exports them.
ROUGE agrees with Google's `rouge-score` (RougeScorer, no stemming) and BLEU with
`sacrebleu.corpus_bleu` (13a tokenizer, exp smoothing), both to 1e-6 (tests/test_metrics.py).

Chinese is scored on characters, without a word segmenter:
- ROUGE: every CJK ideograph is a token of its own; the rest of the text is tokenized as rouge-score
  does (lowercased, runs of [a-z0-9], everything else dropped). English text has no ideographs, so
  it is tokenized exactly as rouge-score does; text of ideographs alone scores on its characters.
- BLEU: a corpus in which any prediction or reference holds a CJK ideograph is tokenized as
  sacrebleu's `zh` tokenizer does (every CJK character, CJK punctuation and full-width form on its
  own, the rest as 13a): `sacrebleu.corpus_bleu(..., tokenize="zh")`, what sacrebleu uses for Chinese.
  Any other corpus is tokenized with 13a, sacrebleu's default.
ChatGLM's P-Tuning recipe segments words with jieba for ROUGE and scores BLEU on characters; here
both are on characters, so no segmenter version changes a score.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Sequence

# CJK Unified Ideographs (and extension A), compatibility ideographs, extensions B-F (planes 2-3).
IDEOGRAPH = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
_IDEOGRAPH = re.compile(f"[{IDEOGRAPH}]")
_ROUGE_TOKEN = re.compile(f"[{IDEOGRAPH}]|[a-z0-9]+")


def final_answer(text: str) -> str:
    """A reasoning model's answer without its reasoning: what follows the last `</think>` (Qwen3 and
    DeepSeek-R1 answer after a `<think>...</think>` block, empty in their non-thinking mode), else the text."""
    return text.rsplit("</think>", 1)[1].strip() if "</think>" in text else text


# ---------------------------------------------------------------------------------------------
# Classification.


def accuracy(predictions: Sequence, references: Sequence) -> float:
    _same_length(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)


def confusion_matrix(predictions: Sequence, references: Sequence, labels: Sequence | None = None):
    """-> (matrix as lists, labels): rows are the true class, columns the predicted one. `labels`
    defaults to the sorted classes seen in either list."""
    _same_length(predictions, references)
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=str)
    index = {v: i for i, v in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, r in zip(predictions, references):
        for v in (p, r):
            if v not in index:
                raise ValueError(f"label {v!r} is not one of {labels}")
        matrix[index[r]][index[p]] += 1
    return matrix, labels


def precision_recall_f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> dict:
    """Per-class, macro and micro precision, recall and F1 (see `from_confusion`)."""
    return from_confusion(*confusion_matrix(predictions, references, labels))


def from_confusion(matrix, labels: Sequence) -> dict[str, float]:
    """{"precision/<label>", "recall/<label>", "f1/<label>", "{precision,recall,f1}_macro",
    "{precision,recall,f1}_micro"} from a confusion matrix (rows true, columns predicted; counts or
    weights). A class never predicted (or never present) has precision (recall) 0, as scikit-learn's
    `zero_division=0`; macro averages every class given. Micro figures pool every decision: with one
    label per example they all equal the accuracy."""
    m = [[float(v) for v in row] for row in matrix]
    out, per = {}, {"precision": [], "recall": [], "f1": []}
    for i, name in enumerate(labels):
        hit, predicted, actual = m[i][i], sum(row[i] for row in m), sum(m[i])
        p, r = _ratio(hit, predicted), _ratio(hit, actual)
        for key, value in (("precision", p), ("recall", r), ("f1", _f1(p, r))):
            out[f"{key}/{name}"] = value
            per[key].append(value)
    for key, values in per.items():
        out[f"{key}_macro"] = sum(values) / max(len(values), 1)
    hits, total = sum(m[i][i] for i in range(len(m))), sum(map(sum, m))
    out["precision_micro"] = out["recall_micro"] = out["f1_micro"] = _ratio(hits, total)
    return out


# ---------------------------------------------------------------------------------------------
# Generation.


def exact_match(predictions: Sequence[str], references: Sequence) -> float:
    """The fraction of predictions equal to (one of) their reference(s), ignoring surrounding whitespace."""
    refs = _reference_lists(predictions, references)
    return sum(p.strip() in {r.strip() for r in rs} for p, rs in zip(predictions, refs)) / max(len(refs), 1)


def tool_calls(text) -> list[tuple[str, str]]:
    """The tool calls written in `text`, as sorted (name, arguments as canonical JSON) pairs: every JSON
    object with a text `name` and an `arguments` (or Llama 3.1's `parameters`) object or JSON text,
    wherever it stands (Qwen's `<tool_call>` tags, Mistral's `[TOOL_CALLS] [...]`, Llama 3.1's bare
    JSON, OpenAI's `tool_calls` list). Key order and spacing do not matter; text that is not JSON is
    skipped. `text` may also be such calls as values (a record's list of calls)."""
    found, decoder, at = [], json.JSONDecoder(), 0
    if not isinstance(text, str):
        _collect_calls(text, found)
        return sorted(found)
    while (at := _next_json(text, at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        _collect_calls(value, found)
        at = end
    return sorted(found)


def _next_json(text: str, at: int) -> int:
    """Where the next JSON object or array may start, from `at`; -1 when none."""
    starts = [i for i in (text.find("{", at), text.find("[", at)) if i >= 0]
    return min(starts, default=-1)


def _collect_calls(value, out: list) -> None:
    if isinstance(value, list):
        for v in value:
            _collect_calls(v, out)
    elif isinstance(value, dict):
        fn = value.get("function") if isinstance(value.get("function"), dict) else value
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if isinstance(fn.get("name"), str) and isinstance(args, dict):
            out.append((fn["name"], json.dumps(args, sort_keys=True, ensure_ascii=False)))
            return
        for v in value.values():
            _collect_calls(v, out)


def tool_call_accuracy(predictions: Sequence[str], references: Sequence) -> float | None:
    """Over the examples whose reference makes tool calls (`tool_calls`), the fraction whose prediction
    makes the same calls (names and arguments as JSON values; in any order); None when no reference
    makes one."""
    calls = [[tool_calls(r) for r in rs] for rs in _reference_lists(predictions, references)]
    scored = [(p, made) for p, made in zip(predictions, calls) if any(made)]
    if not scored:
        return None
    return sum(tool_calls(p) in made for p, made in scored) / len(scored)


def perplexity(loss_sum: float, count: float) -> float:
    """exp(mean negative log-likelihood per token), from summed token NLL and the token count."""
    if count <= 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(min(loss_sum / count, 700.0))  # exp(>709) overflows a float


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokens (lowercase, [a-z0-9]+ runs), with each CJK ideograph a token of its own."""
    return _ROUGE_TOKEN.findall(text.lower())


def rouge(predictions: Sequence[str], references: Sequence) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"}: the mean over examples of each example's F-measure (0-1).

    As `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])` (no stemming, the
    default of rouge-score and of HF evaluate) with the mean of the per-example `fmeasure` (HF
    evaluate's `use_aggregator=False`, averaged; its default aggregator bootstraps an estimate of
    this mean). A reference may be a list: the best-scoring one counts, per ROUGE type, as
    `RougeScorer.score_multi`. rougeL is the LCS over the whole text (not rougeLsum).
    """
    refs = _reference_lists(predictions, references)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, ref_texts in zip(predictions, refs):
        pred = rouge_tokens(prediction)
        best = dict.fromkeys(totals, 0.0)
        for ref in map(rouge_tokens, ref_texts):
            scores = {"rouge1": _ngram_f(ref, pred, 1), "rouge2": _ngram_f(ref, pred, 2), "rougeL": _lcs_f(ref, pred)}
            best = {k: max(best[k], v) for k, v in scores.items()}
        totals = {k: totals[k] + best[k] for k in totals}
    return {k: v / max(len(refs), 1) for k, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence) -> float:
    """Corpus BLEU, 0-100, as `sacrebleu.corpus_bleu` with its defaults (4-grams, exp smoothing,
    cased, 13a tokenizer; the `zh` tokenizer for a corpus with CJK ideographs, see the module docstring).

    `references[i]` is the reference of `predictions[i]`, or a list of them (any number, each
    prediction its own): n-gram counts are clipped by the most any reference holds, and the length
    is that of the closest reference (the shorter on a tie), as sacrebleu does.
    """
    refs = _reference_lists(predictions, references)
    chinese = any(_IDEOGRAPH.search(t) for t in list(predictions) + [r for rs in refs for r in rs])
    tokenize = _tokenize_zh if chinese else _tokenize_13a
    order = 4
    correct, total = [0] * order, [0] * order
    sys_len = ref_len = 0
    for prediction, ref_texts in zip(predictions, refs):
        hyp = tokenize(prediction.rstrip())
        hyp_ngrams = _ngrams(hyp, order)
        clip: Counter = Counter()
        lengths = []
        for ref in ref_texts:
            tokens = tokenize(ref.rstrip())
            lengths.append(len(tokens))
            for gram, n in _ngrams(tokens, order).items():
                clip[gram] = max(clip[gram], n)
        sys_len += len(hyp)
        ref_len += min(lengths, key=lambda r: (abs(len(hyp) - r), r)) if lengths else 0
        for gram, n in hyp_ngrams.items():
            total[len(gram) - 1] += n
            correct[len(gram) - 1] += min(n, clip[gram])
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    if not any(correct):
        return 0.0
    logs, halve = [], 1.0
    for n in range(order):
        if total[n] == 0:  # no n-grams of this order at all: sacrebleu scores log(0) as -1e10
            logs.append(-9999999999.0)
            continue
        if correct[n] == 0:  # exp smoothing (mteval's): 1 / (2^k * total) for the k-th zero count
            halve *= 2
            logs.append(math.log(100.0 / (halve * total[n])))
        else:
            logs.append(math.log(100.0 * correct[n] / total[n]))
    return bp * math.exp(sum(logs) / order)


# ---------------------------------------------------------------------------------------------
# Helpers.


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _same_length(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _reference_lists(predictions, references) -> list[list[str]]:
    _same_length(predictions, references)
    out = []
    for r in references:
        rs = [r] if isinstance(r, str) else list(r)
        if not rs or not all(isinstance(x, str) for x in rs):
            raise ValueError(f"reference {r!r}: expected a string or a non-empty list of strings")
        out.append(rs)
    return out


def _ngram_f(ref: list[str], pred: list[str], n: int) -> float:
    r, p = _ngrams(ref, n, n), _ngrams(pred, n, n)
    hits = sum(min(c, p[g]) for g, c in r.items())
    return _f1(hits / max(sum(p.values()), 1), hits / max(sum(r.values()), 1))


def _lcs_f(ref: list[str], pred: list[str]) -> float:
    if not ref or not pred:
        return 0.0
    lcs = lcs_length(ref, pred)
    return _f1(lcs / len(pred), lcs / len(ref))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): one big-integer
    add per symbol of `b`, so long texts cost O(len(a) * len(b) / 64) word operations."""
    full = (1 << len(a)) - 1
    where: dict = {}
    for i, x in enumerate(a):
        where[x] = where.get(x, 0) | (1 << i)
    v = full
    for y in b:
        u = v & where.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _ngrams(tokens: list[str], max_order: int, min_order: int = 1) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(min_order, max_order + 1)
                   for i in range(len(tokens) - n + 1))


# BLEU tokenizers: sacrebleu's 13a (mteval-v13a) and zh, rewritten.
_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # ASCII punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]
# sacrebleu's `zh` character ranges, as its comparisons of one character against these bounds
# actually behave: two of its bounds are written '\u20000' and '\u2f800', which Python reads as two
# characters, so its "Extension B" range is in effect U+2001..U+2A6D (general punctuation such as
# “ ” — …, arrows, math signs, and the CJK ranges above them) and its supplement U+2F81..U+2FA1.
_ZH = re.compile(
    "[\u3400-\u4db5\u4e00-\u9fa5\u9fa6-\u9fbb\uf900-\ufa2d\ufa30-\ufa6a\ufa70-\ufad9\u2001-\u2a6d"
    "\u2f81-\u2fa1\uff00-\uffef\u2e80-\u2eff\u3000-\u303f\u31c0-\u31ef\u2f00-\u2fdf\u2ff0-\u2fff"
    "\u3100-\u312f\u31a0-\u31bf\ufe10-\ufe1f\ufe30-\ufe4f\u2600-\u26ff\u2700-\u27bf\u3200-\u32ff\u3300-\u33ff]"
)


def _regexp(line: str) -> list[str]:
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def _tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return _regexp(f" {line} ")


def _tokenize_zh(line: str) -> list[str]:
    return _regexp(_ZH.sub(lambda m: f" {m.group(0)} ", line.strip()))
