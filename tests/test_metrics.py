"""Scores against their references: rouge-score, sacrebleu and scikit-learn (test oracles only).

English texts come from the bundled E2E NLG set (several references per meaning representation) and
are perturbed to make predictions; Chinese ones from the bundled ADGEN set. Chinese ROUGE is checked
against rouge-score on text whose ideographs are spelled as ASCII words (so rouge-score's own
tokenizer splits it into characters), Chinese BLEU against sacrebleu's `zh` tokenizer.
"""

from __future__ import annotations

import json
import math
import random

import unicodedata

import pytest

from jaxft import metrics, scores
from jaxft.data.sources import ASSETS

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
sacrebleu = pytest.importorskip("sacrebleu")

TYPES = ("rouge1", "rouge2", "rougeL")


def e2e(n=120, seed=0):
    """(predictions, reference lists): each MR's first reference, perturbed, against all the others."""
    groups: dict[str, list[str]] = {}
    for line in (ASSETS / "e2e_nlg" / "test.txt").read_text(encoding="utf-8").splitlines():
        mr, _, ref = line.partition("||")
        groups.setdefault(mr, []).append(ref)
    rng = random.Random(seed)
    preds, refs = [], []
    for mr, texts in list(groups.items())[:n]:
        if len(texts) < 2:
            continue
        words = texts[0].split()
        for _ in range(rng.randint(0, 4)):  # drop, swap or duplicate a few words
            i = rng.randrange(len(words))
            op = rng.choice("dsu")
            if op == "d" and len(words) > 1:
                words.pop(i)
            elif op == "s":
                j = rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
            else:
                words.insert(i, words[i].upper())
        preds.append(" ".join(words))
        refs.append(texts[1 : 1 + rng.randint(1, 6)])
    return preds, refs


def adgen(n=60, seed=0):
    rows = [json.loads(line) for line in (ASSETS / "adgen" / "dev.json").read_text(encoding="utf-8").splitlines()[:n]]
    rng = random.Random(seed)
    preds, refs = [], []
    for i, row in enumerate(rows):
        ref = row["summary"]
        chars = list(rows[(i + 1) % len(rows)]["summary"][:20] + ref[rng.randint(0, 10) :])
        rng.shuffle(chars[: rng.randint(0, 15)])
        preds.append("".join(chars[: rng.randint(20, len(chars))]) + " OK 2024年")
        refs.append(ref)
    return preds, refs


def rouge_oracle(preds, refs, transform=lambda t: t):
    scorer = rouge_scorer.RougeScorer(list(TYPES))
    out = {k: 0.0 for k in TYPES}
    for p, rs in zip(preds, refs):
        rs = [rs] if isinstance(rs, str) else rs
        s = scorer.score_multi([transform(r) for r in rs], transform(p))
        for k in TYPES:
            out[k] += s[k].fmeasure
    return {k: v / len(preds) for k, v in out.items()}


def spell_ideographs(text: str) -> str:
    """Each CJK ideograph as its own ASCII word ('很' -> ' u5f88 '), which rouge-score keeps whole."""
    ideograph = lambda c: unicodedata.name(c, "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"))  # noqa: E731
    return "".join(f" u{ord(c):x} " if ideograph(c) else c for c in text)


def sacre(preds, refs, tokenize):
    """sacrebleu's reference streams: stream k holds every prediction's k-th reference or None."""
    refs = [[r] if isinstance(r, str) else r for r in refs]
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(max(map(len, refs)))]
    return sacrebleu.corpus_bleu(preds, streams, tokenize=tokenize).score


# --------------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_english_matches_rouge_score():
    preds, refs = e2e()
    got, want = metrics.rouge(preds, refs), rouge_oracle(preds, refs)
    assert set(got) == set(TYPES)
    for k in TYPES:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert 0.3 < got["rouge1"] < 1.0  # perturbed references: a real, non-trivial score


def test_rouge_single_reference_edge_cases():
    cases = (["The cat sat.", "", "a b c", "x", "It's 3.5 km-away!"],
             ["the cat sat on the mat", "nothing here", "", "x", "its 3 5 km away"])
    got, want = metrics.rouge(*cases), rouge_oracle(*cases)
    for k in TYPES:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_rouge_chinese_scores_characters():
    preds, refs = adgen()
    got = metrics.rouge(preds, refs)
    want = rouge_oracle(preds, refs, spell_ideographs)
    for k in TYPES:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert rouge_oracle(preds, refs)["rouge1"] < 0.2 < 0.4 < got["rouge1"]  # rouge-score alone drops every ideograph


def test_rouge_tokens_rule():
    assert scores.rouge_tokens("iPhone很好，Don't 2024年!") == ["iphone", "很", "好", "don", "t", "2024", "年"]


def test_lcs_length_against_dynamic_programming():
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
        assert scores.lcs_length(a, b) == table[-1][-1]


# --------------------------------------------------------------------------------------------------
# BLEU


def test_bleu_english_matches_sacrebleu_with_several_references():
    preds, refs = e2e()
    got = metrics.bleu(preds, refs)
    assert got == pytest.approx(sacre(preds, refs, "13a"), abs=1e-6)
    assert 20 < got < 100


def test_bleu_single_references_and_13a_details():
    preds = ['He said &quot;no&quot; - 3.5-4, e.g. "x".', "A long-\nline <skipped>here", "zero overlap", "The end ."]
    refs = ['he said "no" - 3.5-4 , e.g. " x " .', "a long line here", "nothing at all", "The end."]
    assert metrics.bleu(preds, refs) == pytest.approx(sacre(preds, refs, "13a"), abs=1e-6)


@pytest.mark.parametrize("preds,refs", [
    (["a b c"], ["d e f"]),  # nothing matches: 0
    (["a b"], ["a b c d e"]),  # no 3- or 4-grams in the prediction
    (["a b c d e"], ["a x c y e"]),  # unigrams only: exp smoothing
    (["the the the the"], [["the cat", "the the dog"]]),  # clipping by the most any reference holds
    (["one two three four five six"], [["one two", "one two three four five six seven eight", "x y z w"]]),
])
def test_bleu_edge_cases(preds, refs):
    assert metrics.bleu(preds, refs) == pytest.approx(sacre(preds, refs, "13a"), abs=1e-6)


def test_bleu_closest_reference_length_prefers_the_shorter_on_a_tie():
    preds, refs = ["a b c d e"], [["a b c", "a b c d e f g"]]  # 3 and 7 are both 2 away: 3 counts, no penalty
    assert metrics.bleu(preds, refs) == pytest.approx(sacre(preds, refs, "13a"), abs=1e-6)


def test_bleu_chinese_matches_sacrebleu_zh_and_char_split_13a():
    preds, refs = adgen()
    got = metrics.bleu(preds, refs)
    assert got == pytest.approx(sacre(preds, refs, "zh"), abs=1e-6)
    # The same as 13a on text with each ideograph (and CJK punctuation) spaced out.
    split = lambda t: scores._ZH.sub(lambda m: f" {m.group(0)} ", t)  # noqa: E731
    assert got == pytest.approx(sacre([split(p) for p in preds], [split(r) for r in refs], "13a"), abs=1e-6)
    assert sacre(preds, refs, "13a") < got  # unsplit, whole clauses rarely match


def test_bleu_zh_rule_quirks_match_sacrebleu():
    # sacrebleu's zh ranges also take general punctuation (U+2001..U+2A6D: “ ” — …) and full-width forms.
    preds = ["他说“好的”——然后…走了。ＡＢ", "价格100元, very good!"]
    refs = [["他说：“好”，然后走了。ＡＢ"], ["价格 100 元，very good !", "很好"]]
    assert metrics.bleu(preds, refs) == pytest.approx(sacre(preds, refs, "zh"), abs=1e-6)


def test_bleu_and_rouge_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.rouge(["a"], [[]])


# --------------------------------------------------------------------------------------------------
# Classification, exact match, perplexity


def test_precision_recall_f1_against_hand_computed():
    # true:  a a a b b c ; predicted: a a b b c c
    # a: tp 2, predicted 2, actual 3 -> p 1, r 2/3, f1 0.8
    # b: tp 1, predicted 2, actual 2 -> p 0.5, r 0.5, f1 0.5
    # c: tp 1, predicted 2, actual 1 -> p 0.5, r 1, f1 2/3
    got = metrics.precision_recall_f1(list("aabbcc"), list("aaabbc"))
    assert got["precision/a"] == 1.0 and got["recall/a"] == pytest.approx(2 / 3) and got["f1/a"] == pytest.approx(0.8)
    assert got["f1/b"] == 0.5 and got["f1/c"] == pytest.approx(2 / 3)
    assert got["precision_macro"] == pytest.approx(2 / 3)
    assert got["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert got["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert got["f1_micro"] == got["precision_micro"] == got["recall_micro"] == pytest.approx(4 / 6)
    assert metrics.accuracy(list("aabbcc"), list("aaabbc")) == pytest.approx(4 / 6)


def test_precision_recall_f1_against_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = ["neg", "neu", "pos", "never"]  # "never" is neither true nor predicted: zeros, still averaged
    y = [rng.choice(labels[:3]) for _ in range(300)]
    p = [t if rng.random() < 0.6 else rng.choice(labels[:3]) for t in y]
    got = metrics.precision_recall_f1(p, y, labels)
    for avg in ("macro", "micro"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, p, labels=labels, average=avg, zero_division=0)
        assert (got[f"precision_{avg}"], got[f"recall_{avg}"], got[f"f1_{avg}"]) == pytest.approx((pr, rc, f1))
    pr, rc, f1, _ = skm.precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    for i, name in enumerate(labels):
        assert (got[f"precision/{name}"], got[f"recall/{name}"], got[f"f1/{name}"]) == pytest.approx((pr[i], rc[i], f1[i]))
    assert metrics.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))


def test_summarize_reports_macro_scores_from_the_confusion_matrix():
    confusion = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # the hand-computed example above
    out = metrics.summarize({"loss_sum": 3.0, "count": 6, "correct": 4, "confusion": confusion}, "eval", False,
                            ["a", "b", "c"])
    assert out["eval/f1/a"] == pytest.approx(0.8) and out["eval/f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert out["eval/precision_macro"] == pytest.approx(2 / 3)
    assert not any(k.endswith("_micro") for k in out)  # equal to the accuracy


def test_exact_match_and_perplexity():
    assert metrics.exact_match([" Paris ", "paris", "Rome"], ["Paris", "Paris", ["Milan", "Rome"]]) == pytest.approx(2 / 3)
    assert metrics.perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


def test_generation_scores_read_the_answer_after_the_reasoning():
    """A reasoning model's <think> block (Qwen3's, empty in its non-thinking mode) is not scored, in a
    prediction or a reference: the figures are those of the answers alone."""
    from jaxft.evaluate import generation_scores
    from jaxft.scores import final_answer

    preds = ["<think>\n\n</think>\n\nthe cat sat on the mat", "<think>\n4 × 3 = 12\n</think>\n\n答案是12", "no tags"]
    refs = [["the cat sat on a mat"], "<think>乘法</think>答案是12", "no tags here"]
    answers = ["the cat sat on the mat", "答案是12", "no tags"]
    assert [final_answer(p) for p in preds] == answers
    got = generation_scores(preds, refs)
    assert got == generation_scores(answers, [["the cat sat on a mat"], "答案是12", "no tags here"])
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert generation_scores(preds, refs, ["a", "b", "b"])["exact_match/b"] == pytest.approx(1 / 2)


def test_tool_calls_are_compared_as_json():
    """A tool call is right when its name and arguments are, whatever the key order, spacing or the
    format around it (Qwen's <tool_call> tags, Mistral's list, Llama 3.1's `parameters`)."""
    from jaxft.evaluate import generation_scores
    from jaxft.scores import tool_calls

    qwen = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海", "unit": "c"}}\n</tool_call>')
    assert tool_calls(qwen) == [("get_weather", '{"city": "上海", "unit": "c"}'),
                                ("get_weather", '{"city": "北京", "unit": "c"}')]
    # an argument holding a "name" is part of its call, not a call of its own
    assert tool_calls('{"name": "add_user", "arguments": {"user": {"name": "Li", "arguments": {}}}}') == [
        ("add_user", '{"user": {"arguments": {}, "name": "Li"}}')]
    assert tool_calls('[TOOL_CALLS] [{"name": "f", "arguments": "{\\"a\\": 1}"}] {not json') == [("f", '{"a": 1}')]
    assert tool_calls('Paris is {sunny} and {"name": "x"} has no arguments') == []
    refs = [qwen, qwen, qwen, qwen, "晴天"]
    preds = [  # the calls in the other order, keys reordered, no spaces: right
             '[TOOL_CALLS] [{"arguments":{"unit":"c","city":"上海"},"name":"get_weather"},'
             '{"name":"get_weather","parameters":{"city":"北京","unit":"c"}}]',
             qwen.replace("上海", "广州"),  # a wrong argument
             qwen.split("\n<tool_call>")[0] + "\n",  # one of the two calls
             "北京和上海都是晴天",  # an answer instead of the calls
             "晴天"]  # not a call: not counted
    got = generation_scores(preds, refs)
    assert got["tool_call_accuracy"] == pytest.approx(1 / 4)
    assert "tool_call_accuracy" not in generation_scores(["晴天"], ["晴天"])
    assert generation_scores(preds, refs, ["a", "a", "b", "b", "b"])["tool_call_accuracy/a"] == pytest.approx(1 / 2)
