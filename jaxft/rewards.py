"""Reward functions for GRPO, with TRL's GRPOTrainer calling convention so TRL reward functions work as is.

A reward function is called as `fn(prompts=..., completions=..., completion_ids=..., **columns)` and returns
one float (or None: "no opinion on this completion") per completion. `prompts` and `completions` hold str
(standard data) or lists of {"role", "content"} messages (conversational data; a completion is then
`[{"role": "assistant", "content": text}]`); `completion_ids` the sampled token ids; `columns` maps every
other field of the dataset records to a list with one value per completion (None where a record lacks it).

`train.grpo_rewards` names the functions: built-ins (`BUILTIN`; `rouge=FIELD` reads the reference from
FIELD), `module.path:function`, `path/to/file.py:function`, or `model=PATH`, a reward model (`RewardModel`). `load` resolves them, `score` calls them and sums their weighted rewards.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
from typing import Callable

import numpy as np

from jaxft.errors import JaxftError, read_json

SETTING, WEIGHTS = "train.grpo_rewards", "train.grpo_reward_weights"


def text_of(x) -> str:
    """The text of a prompt or completion: the str itself, or the content of a conversation's last message."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return str(x.get("content") or "")
    if isinstance(x, (list, tuple)):
        return text_of(x[-1]) if x else ""
    return "" if x is None else str(x)


# --- sentiment: a toy lexicon reward ---------------------------------------------------------------------

POSITIVE_EN = frozenset("""
good great best better fun funny wonderful beautiful love loved lovely enjoyable enjoy brilliant charming
moving delightful excellent amazing fantastic perfect masterpiece entertaining engaging gripping powerful
touching hilarious clever witty smart fresh remarkable superb impressive stunning compelling heartfelt
memorable pleasure
""".split())

NEGATIVE_EN = frozenset("""
bad worst worse boring bored dull awful terrible horrible mess messy stupid tedious waste wasted poor poorly
weak flat bland lame predictable pointless mediocre disappointing disappointment annoying ugly hate hated
dumb silly clumsy forgettable lifeless tiresome unfunny painful pretentious shallow
""".split())

# Negated positives (不好, 不满意, ...) are negative entries; 不贵 ("not expensive") is a positive one.
POSITIVE_ZH = frozenset("好 棒 喜欢 满意 精彩 不错 推荐 舒服 干净 方便 漂亮 开心 不贵".split())
NEGATIVE_ZH = frozenset("差 失望 糟糕 难吃 脏 贵 吵 慢 不好 不满意 退货 垃圾 不喜欢 不推荐 不舒服 不方便 不干净 不开心".split())

# Longest entries first, each match blanked before shorter ones are counted: "不好" is one negative, not
# also a "好"; "不满意" not also a "满意".
_ZH = sorted([(w, 1) for w in POSITIVE_ZH] + [(w, -1) for w in NEGATIVE_ZH], key=lambda e: (-len(e[0]), e[0]))
_WORD = re.compile(r"[a-z']+")


def lexicon_counts(text: str) -> tuple[int, int]:
    """(positive, negative) lexicon entries in `text`: English words plus non-overlapping Chinese entries."""
    p = n = 0
    for word in _WORD.findall(text.lower()):
        p += word in POSITIVE_EN
        n += word in NEGATIVE_EN
    for entry, sign in _ZH:
        count = text.count(entry)
        if count:
            text = text.replace(entry, " ")
            if sign > 0:
                p += count
            else:
                n += count
    return p, n


def sentiment(prompts, completions, **kwargs) -> list[float]:
    """(p - n) / (p + n + 1) in [-1, 1], p and n the positive and negative lexicon entries in the completion.

    A toy reward for demos (steering an LM towards positive movie or product reviews): a small English and
    Chinese word list, not a sentiment model, so it is easy to game (e.g. by repeating "great").
    """
    out = []
    for completion in completions:
        p, n = lexicon_counts(text_of(completion))
        out.append((p - n) / (p + n + 1))
    return out


# --- accuracy: verifiable answers -------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _references(columns: dict, names, n: int, needs: str) -> list:
    """Each completion's reference: the first of the record's fields `names` that it has (None where it has
    none); `needs` (what the reward needs) starts the error when the records have none of them."""
    fields = [columns[k] for k in names if k in columns]
    if not fields:
        raise JaxftError(f"{SETTING}: {needs}; they have {sorted(columns) or 'no other fields'}")
    return [next((f[i] for f in fields if f[i] is not None), None) for i in range(n)]


def _answer_span(text: str) -> str:
    """The last <answer>...</answer> span's content; else what follows the reasoning (`scores.final_answer`:
    Qwen3's and DeepSeek-R1's `<think>...</think>` block is not the answer), the whole text if there is none."""
    from jaxft.scores import final_answer

    spans = _ANSWER.findall(text)
    return spans[-1] if spans else final_answer(text)


def _reference_number(reference: str) -> float | None:
    plain = reference.strip().replace(",", "")
    return float(plain) if _PLAIN_NUMBER.fullmatch(plain) else None


def accuracy(prompts, completions, **columns) -> list[float | None]:
    """1.0 if the completion's answer matches the record's `answer` (else `solution`) field, else 0.0.

    GSM8K references ("...#### 1,234") count from the last "####". A numeric reference is compared with
    the last number of the completion's answer (its last <answer>...</answer> span if it has one, else
    what follows a `</think>`, else all of it); another reference must equal that answer up to case and
    whitespace. A record with no reference gets None.
    """
    out: list[float | None] = []
    refs = _references(columns, ("answer", "solution"), len(completions), "the accuracy reward needs an `answer` "
                      "or `solution` field in the records")
    for completion, reference in zip(completions, refs):
        if reference is None:
            out.append(None)
            continue
        reference = str(reference)
        if "####" in reference:
            reference = reference.rsplit("####", 1)[1]
        answer = _answer_span(text_of(completion))
        expected = _reference_number(reference)
        if expected is None:
            out.append(float(_normalize(answer) == _normalize(reference)))
            continue
        numbers_ = _NUMBER.findall(answer)
        right = bool(numbers_) and abs(float(numbers_[-1].replace(",", "")) - expected) < 1e-6
        out.append(float(right))
    return out


# --- format: DeepSeek-R1's format reward ------------------------------------------------------------------

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def format(prompts, completions, **kwargs) -> list[float]:  # the setting's name; shadows builtins.format here only
    """1.0 if the completion is `<think>...</think> <answer>...</answer>` and nothing else, else 0.0."""
    return [float(_FORMAT.match(text_of(c)) is not None) for c in completions]


# --- rouge: overlap with a reference text -----------------------------------------------------------------


class Rouge:
    """ROUGE-L F-measure (0-1; `jaxft.scores.rouge`, as rouge-score computes it, words lowercased, each CJK
    character a word) of the completion's answer (as `accuracy` reads it: reasoning in <think> tags is not
    scored, as the eval's ROUGE does not score it) against the record's reference text (a list: the best),
    for summarisation and data-to-text. `rouge` reads the `reference`, `answer` or `solution` field;
    `rouge=FIELD` names the field (`rouge=human_reference` for the bundled E2E NLG). A record with no
    reference gets None."""

    FIELDS = ("reference", "answer", "solution")

    def __init__(self, field: str = ""):
        self.fields = (field,) if field else self.FIELDS
        self.__name__ = "rouge"

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        from jaxft import scores

        out: list[float | None] = []
        refs = _references(columns, self.fields, len(completions), f"the rouge reward needs a "
                          f"{' or '.join(map(repr, self.fields))} field in the records (rouge=FIELD names another)")
        for completion, reference in zip(completions, refs):
            if reference is not None and not isinstance(reference, list):
                reference = str(reference)
            answer = _answer_span(text_of(completion))
            out.append(None if reference is None else scores.rouge([answer], [reference])["rougeL"])
        return out


rouge = Rouge()


def tool_calls(prompts, completions, **columns) -> list[float | None]:
    """1.0 if the completion makes the tool calls the record's `tool_calls` field makes (a list of calls in
    OpenAI's or the bare {"name", "arguments"} form, or their text; else the `answer` field's), else 0.0:
    names and arguments compared as JSON values, in any order (`jaxft.scores.tool_calls`). An empty list
    asks for no call. A record with no reference gets None."""
    from jaxft import scores

    out: list[float | None] = []
    refs = _references(columns, ("tool_calls", "answer"), len(completions), "the tool_calls reward needs a "
                      "`tool_calls` or `answer` field in the records")
    for completion, reference in zip(completions, refs):
        made = scores.tool_calls(scores.final_answer(text_of(completion)))
        out.append(None if reference is None else float(made == scores.tool_calls(reference)))
    return out


BUILTIN: dict[str, Callable] = {"sentiment": sentiment, "accuracy": accuracy, "format": format, "rouge": rouge,
                                "tool_calls": tool_calls}


# --- a reward model ---------------------------------------------------------------------------------------


class RewardModel:
    """A reward model as a reward function (`model=PATH` in the spec): the score a sequence classifier
    with one output gives each prompt + completion. PATH: a HF `*ForSequenceClassification` directory
    (num_labels=1), or an adapter directory on its base (`data.task=reward`'s export: the base is the one
    its adapter_config.json names). Each pair is rendered as `data.task=reward` trains on it: the prompt
    as the user's turn (a conversational prompt's turns as they are), the completion as the assistant's,
    in the reward model's chat template (else jaxft's default), cut to `max_length` tokens as SFT cuts."""

    BATCH, WIDTHS = 16, (32, 64, 128, 256, 512, 1024)  # rows and padded widths per call: few compiles

    def __init__(self, path: str, max_length: int = 1024):
        from pathlib import Path

        import jax

        from jaxft.data import sft
        from jaxft.generate import load
        from jaxft.tokenizer import Tokenizer

        where = f"{SETTING}: model={path}"
        p = Path(path)
        if not p.is_dir():
            raise JaxftError(f"{where}: no such directory (expected a reward model or its adapter)")
        if (p / "adapter_config.json").is_file():
            base = read_json(p / "adapter_config.json").get("base_model_name_or_path") or ""
            if not base:
                raise JaxftError(f"{where}: its adapter_config.json names no base model (base_model_name_or_path)")
            model, params, root = load(base, str(p))
        else:
            model, params, root = load(str(p))
        cfg = model.cfg
        if cfg.head != "classification" or cfg.num_labels != 1:
            raise JaxftError(f"{where}: a {cfg.head} model with {cfg.num_labels} outputs; expected a reward model, a "
                             "sequence classifier with one output (data.task=reward trains one)")
        self.tok = Tokenizer(p if any((p / f).exists() for f in ("tokenizer.model", "tokenizer.json")) else root)
        self.renderer = sft.renderer(self.tok)
        self.max_length, self.params = max_length, jax.device_put(params)
        self.__name__ = "reward_model"
        self._score = jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask)[:, 0])

    def ids(self, prompt, completion) -> list[int]:
        from jaxft.data import sft

        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = turns + [{"role": "assistant", "content": text_of(completion)}]
        ids, mask = sft.encode(self.renderer.last_answer(messages), self.tok)
        return sft.truncate(ids, mask, self.max_length, self.tok.bos_id)[0]

    def __call__(self, prompts, completions, **columns) -> list[float]:
        rows = [self.ids(p, c) for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(rows), self.BATCH):
            chunk = rows[i:i + self.BATCH]
            width = next((w for w in self.WIDTHS if w >= max(map(len, chunk))), self.max_length)
            ids = np.full((self.BATCH, width), self.tok.pad_id or 0, np.int32)
            mask = np.zeros((self.BATCH, width), np.int32)
            mask[:, 0] = 1  # rows that only fill the batch: one token each
            for r, x in enumerate(chunk):
                ids[r, :len(x)], mask[r, :len(x)] = x, 1
            out += np.asarray(self._score(self.params, ids, mask))[: len(chunk)].astype(float).tolist()
        return out


_MODELS: dict = {}  # reward models already loaded, by path


# --- loading and scoring ----------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


_FILES: dict = {}  # reward files already run, by absolute path


def _resolve(item: str) -> tuple[str, Callable]:
    """(name, function) for one item of the spec."""
    if item.startswith("model="):  # loaded once per process
        path = item[len("model="):]
        if path not in _MODELS:
            _MODELS[path] = RewardModel(path)
        return "reward_model", _MODELS[path]
    if item.startswith("rouge="):
        field = item[len("rouge="):].strip()
        if not field:
            raise JaxftError(f"{SETTING}: {item!r}: expected rouge=FIELD, the records' field holding the reference")
        return "rouge", Rouge(field)
    if ":" not in item:
        if item not in BUILTIN:
            raise JaxftError(
                f"{SETTING}: unknown reward {item!r}: expected a built-in ({', '.join(BUILTIN)}), rouge=FIELD, "
                f"module.path:function, path/to/file.py:function or model=PATH")
        return item, BUILTIN[item]
    target, attr = item.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise JaxftError(f"{SETTING}: reward file {target!r} (in {item!r}) does not exist "
                             f"(relative to {os.getcwd()})")
        name = "jaxft_reward_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(target))[0])
        module = _FILES.get(os.path.abspath(target))
        try:
            if module is None:  # run once per process, as an import is: it may load a model
                spec = importlib.util.spec_from_file_location(name, target)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _FILES[os.path.abspath(target)] = module
        except Exception as e:
            raise JaxftError(f"{SETTING}: cannot load reward file {target!r} (in {item!r}): {_one_line(e)}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise JaxftError(f"{SETTING}: cannot import module {target!r} (in {item!r}): {_one_line(e)}") from e
    if not hasattr(module, attr):
        raise JaxftError(f"{SETTING}: {target!r} has no attribute {attr!r} (in {item!r}): expected a reward function")
    fn = getattr(module, attr)
    if not callable(fn):
        raise JaxftError(f"{SETTING}: {item!r} is a {type(fn).__name__}, not callable: expected a reward function")
    return getattr(fn, "__name__", attr), fn


def load(spec: str, weights: str = "") -> list[tuple[str, Callable, float]]:
    """[(name, function, weight)] for a comma-separated spec of built-ins, module:function, file.py:function."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise JaxftError(
            f"{SETTING} is empty: expected comma-separated reward functions, built-ins ({', '.join(BUILTIN)}) or "
            f"module.path:function or path/to/file.py:function or model=PATH (a reward model), e.g. sentiment, "
            f"accuracy,format or mypkg.rewards:fn")
    functions = [_resolve(item) for item in items]
    if not str(weights).strip():
        values = [1.0] * len(functions)
    else:
        parts = [s.strip() for s in str(weights).split(",")]
        values = []
        for part in parts:
            try:
                value = float(part)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise JaxftError(f"{WEIGHTS}={weights!r}: {part!r} is not a number: expected comma-separated numbers")
            values.append(value)
        if len(values) != len(functions):
            raise JaxftError(
                f"{WEIGHTS}={weights!r}: {len(values)} weights for {len(functions)} reward functions "
                f"({', '.join(name for name, _ in functions)}): expected one weight per function")
    return [(name, fn, w) for (name, fn), w in zip(functions, values)]


RESERVED = ("prompts", "completions", "completion_ids")


def _check(name: str, values, n: int) -> np.ndarray:
    """A function's rewards as float64 [n], None -> NaN; an error for anything but n finite numbers or None."""
    if isinstance(values, np.ndarray):
        values = values.tolist() if values.ndim == 1 else values
    if not isinstance(values, (list, tuple)):
        raise JaxftError(f"{SETTING}: reward function {name!r} returned a {type(values).__name__}: "
                         f"expected a list of {n} numbers or None")
    if len(values) != n:
        raise JaxftError(f"{SETTING}: reward function {name!r} returned {len(values)} values for {n} completions")
    out = np.empty(n, np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
        elif isinstance(v, numbers.Real):
            if not math.isfinite(v):
                raise JaxftError(f"{SETTING}: reward function {name!r} returned {v!r} at position {i}: "
                                 f"expected a finite number or None")
            out[i] = v
        else:
            raise JaxftError(f"{SETTING}: reward function {name!r} returned a {type(v).__name__} at position {i}: "
                             f"expected a number or None")
    return out


def score(functions, prompts, completions, completion_ids, columns) -> tuple[np.ndarray, np.ndarray]:
    """(total [n], per_function [k, n]) float32 rewards: total is the NaN-skipping weighted sum (0 where
    every function gave None), per_function keeps None as NaN. Columns named like the convention's own
    arguments (prompts, completions, completion_ids) are not passed."""
    n = len(completions)
    extra = {k: v for k, v in columns.items() if k not in RESERVED}
    per = np.zeros((len(functions), n), np.float64)
    weights = np.zeros(len(functions), np.float64)
    for j, (name, fn, weight) in enumerate(functions):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **extra)
        per[j] = _check(name, values, n)
        weights[j] = weight
    total = np.nansum(weights[:, None] * per, axis=0)
    return total.astype(np.float32), per.astype(np.float32)
