"""GRPO reward functions: the built-ins on hand-made examples (expected values from their formulas), loading
by name, module and file, and `score`'s checks and weighted NaN-skipping sum. No JAX needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxft import rewards
from jaxft.errors import JaxftError


def lex(p, n):
    return (p - n) / (p + n + 1)


def chat(text):
    return [{"role": "assistant", "content": text}]


# --- sentiment --------------------------------------------------------------------------------------------


def test_lexicon_sizes():
    assert len(rewards.POSITIVE_EN) == 40 and len(rewards.NEGATIVE_EN) == 40
    assert not rewards.POSITIVE_EN & rewards.NEGATIVE_EN
    assert not rewards.POSITIVE_ZH & rewards.NEGATIVE_ZH


def test_sentiment_english():
    completions = [
        "a great and fun movie",
        "A boring, dull MESS. The worst!",
        "Good acting, but a tedious plot.",
        "an ordinary film about a dog",
        "",
        "great great great",
    ]
    got = rewards.sentiment(prompts=[""] * 6, completions=completions)
    assert got == pytest.approx([lex(2, 0), lex(0, 4), lex(1, 1), lex(0, 0), 0.0, lex(3, 0)])
    assert got[0] == pytest.approx(2 / 3) and got[1] == pytest.approx(-4 / 5)


def test_sentiment_chinese_and_negation():
    completions = [
        "很好，很干净，推荐",  # 好 干净 推荐
        "房间很脏，服务差，太失望了",  # 脏 差 失望
        "不好",  # negative only: the 好 inside 不好 does not count
        "不满意",  # negative only
        "早餐不好，但是位置方便，我很满意",  # 不好 | 方便 满意
        "不满意，不好，好",  # 不满意 不好 | 好
        "价格不贵",  # 不贵 is positive, not a 贵
    ]
    got = rewards.sentiment(prompts=[""] * len(completions), completions=completions)
    assert got == pytest.approx([lex(3, 0), lex(0, 3), lex(0, 1), lex(0, 1), lex(2, 1), lex(1, 2), lex(1, 0)])
    assert rewards.lexicon_counts("不好") == (0, 1)
    assert rewards.lexicon_counts("不满意") == (0, 1)
    assert rewards.lexicon_counts("好好好") == (3, 0)


def test_sentiment_conversational():
    prompts = [[{"role": "user", "content": "Review the film. It was bad."}]] * 2
    completions = [chat("It was wonderful and charming."), chat("Terrible.")]
    assert rewards.sentiment(prompts=prompts, completions=completions) == pytest.approx([lex(2, 0), lex(0, 1)])


def test_text_of():
    assert rewards.text_of("abc") == "abc"
    assert rewards.text_of([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert rewards.text_of([]) == ""
    assert rewards.text_of(None) == ""


# --- accuracy ---------------------------------------------------------------------------------------------


def test_accuracy_gsm8k():
    ref = "Half of 2,468 is 1,234.\n#### 1,234"
    completions = [
        "2468 / 2 = 1234, so 1234",
        "so the answer is 1,234.",
        "1234 ... no wait, 1235",
        "I got 1234 at first. <answer>1235</answer>",
        "First 17 apples. <answer>That is 1,234</answer> then 99",
        "no number here",
        "1234.0",
    ]
    got = rewards.accuracy(prompts=[""] * 7, completions=completions, answer=[ref] * 7)
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_accuracy_numbers():
    completions = ["It is -3.5", "it is 3.5", "x = 12", "<answer>7</answer><answer>8</answer>"]
    answers = ["-3.5", "-3.5", 12, "8"]
    assert rewards.accuracy(prompts=[""] * 4, completions=completions, answer=answers) == [1.0, 0.0, 1.0, 1.0]


def test_accuracy_text_reference_and_none():
    completions = ["  Paris ", "<think>hmm</think><answer> New   york</answer>", "London", "anything", "Rome",
                   "<think>Lyon? No.</think>\n\nParis", "<think>Paris? No.</think>Lyon"]  # Qwen3's reasoning
    got = rewards.accuracy(
        prompts=[""] * 7, completions=completions,
        answer=["paris", "New York", "Paris", None, None, "Paris", "Paris"],
        solution=[None, None, None, None, "rome", None, None])
    assert got == [1.0, 1.0, 0.0, None, 1.0, 1.0, 0.0]


def test_accuracy_solution_column_and_conversational():
    got = rewards.accuracy(prompts=[[{"role": "user", "content": "2+2?"}]] * 2,
                           completions=[chat("4"), chat("5")], solution=["#### 4", "#### 4"])
    assert got == [1.0, 0.0]


def test_accuracy_needs_a_reference_column():
    with pytest.raises(JaxftError, match=r"train\.grpo_rewards.*accuracy.*`answer` or `solution`"):
        rewards.accuracy(prompts=["q"], completions=["4"], label=["4"])



def test_tool_calls_reward():
    """The completion's calls against the record's, as JSON values: OpenAI's list, its JSON text, an empty
    list (no call asked), no reference; reasoning before the calls is not read."""
    openai = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]
    qwen = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    completions = [qwen, qwen.replace("北京", "上海"), "<think>{\"name\": \"x\", \"arguments\": {}}</think>" + qwen,
                   "北京晴。", qwen, "北京晴。", qwen]
    got = rewards.tool_calls(prompts=[""] * 7, completions=completions,
                             tool_calls=[openai, openai, '[{"name": "get_weather", "arguments": {"city": "北京"}}]',
                                         openai, [], [], None])
    assert got == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, None]
    assert rewards.load("tool_calls")[0][:2] == ("tool_calls", rewards.tool_calls)
    with pytest.raises(JaxftError, match="tool_calls reward needs a `tool_calls` or `answer` field"):
        rewards.tool_calls(prompts=["q"], completions=[qwen], label=["x"])

# --- format -----------------------------------------------------------------------------------------------


def test_format():
    completions = [
        "<think>a\nb</think><answer>4</answer>",
        "  <think>x</think>\n\n<answer>\n4\n</answer>\n",
        "<answer>4</answer>",
        "<think>x</think>",
        "<think>x</think><answer>4</answer> trailing",
        "preamble <think>x</think><answer>4</answer>",
        "<answer>4</answer><think>x</think>",
    ]
    assert rewards.format(prompts=[""] * 7, completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.format(prompts=[""], completions=[chat("<think>t</think><answer>a</answer>")]) == [1.0]


# --- rouge ------------------------------------------------------------------------------------------------


def test_rouge_is_rouge_scores_rouge_l():
    scorer = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])
    refs = ["The Eagle is a coffee shop near Burger King .", "Blue Spice serves Italian food in the city centre"]
    completions = ["Eagle coffee shop , near the Burger King", chat("Italian food : Blue Spice , city centre")]
    want = [scorer.score(r, rewards.text_of(c))["rougeL"].fmeasure for r, c in zip(refs, completions)]
    assert rewards.rouge(prompts=["", ""], completions=completions, reference=refs) == pytest.approx(want)
    assert 0 < min(want) < max(want) < 1
    # rouge=FIELD reads another field; several references: the best; no reference: None
    [(name, fn, _)] = rewards.load("rouge=human_reference")
    got = fn(prompts=[""] * 3, completions=[completions[0]] * 3, human_reference=[refs[0], [refs[1], refs[0]], None])
    assert name == "rouge" and got[:2] == pytest.approx([want[0], want[0]]) and got[2] is None
    assert rewards.rouge(prompts=[""], completions=["a b"], answer=["a b"]) == [1.0]
    # the answer after a reasoning block, or in R1's <answer> tags, as the eval scores it
    thought = ["<think>Coffee? Pub? Burger King .</think>\n\n" + rewards.text_of(completions[0]),
               "<think>near</think> <answer>" + rewards.text_of(completions[0]) + "</answer>"]
    assert rewards.rouge(prompts=[""] * 2, completions=thought, reference=[refs[0]] * 2) == pytest.approx([want[0]] * 2)
    with pytest.raises(JaxftError, match=r"the rouge reward needs a 'reference' or 'answer' or 'solution' field .*"
                                         r"rouge=FIELD.* they have \['mr'\]"):
        rewards.rouge(prompts=[""], completions=["x"], mr=["y"])
    with pytest.raises(JaxftError, match="'rouge=': expected rouge=FIELD"):
        rewards.load("rouge=")


# --- load -------------------------------------------------------------------------------------------------

MODULE = """
def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

NOT_A_FUNCTION = 3
"""


def test_load_builtins():
    got = rewards.load(" accuracy,format ")
    assert [(name, fn, w) for name, fn, w in got] == [("accuracy", rewards.accuracy, 1.0),
                                                     ("format", rewards.format, 1.0)]
    assert set(rewards.BUILTIN) == {"sentiment", "accuracy", "format", "rouge", "tool_calls"}


def test_load_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    [(name, fn, w)] = rewards.load("my_rewards_mod:length_reward")
    assert (name, w) == ("length_reward", 1.0) and fn(prompts=["p"], completions=["abc"]) == [3.0]

    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "file_rewards.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    got = rewards.load("sentiment, sub/file_rewards.py:length_reward", "0.5,2")
    assert [(n, w) for n, _, w in got] == [("sentiment", 0.5), ("length_reward", 2.0)]
    assert got[1][1](prompts=[""], completions=["ab"]) == [2.0]
    # a file runs once per process, as an imported module does (it may load a model): loaded again, the same
    (sub / "counted.py").write_text("RUNS = []\nRUNS.append(1)\ndef fn(prompts, completions, **kw):\n"
                                    "    return [float(len(RUNS))] * len(prompts)\n")
    fns = [rewards.load("sub/counted.py:fn")[0][1] for _ in range(3)]
    assert fns[0] is fns[2] and fns[2](prompts=["p"], completions=["c"]) == [1.0]


@pytest.mark.parametrize("spec, match", [
    ("", r"train\.grpo_rewards is empty: expected .*e\.g\. sentiment"),
    (" , ", r"train\.grpo_rewards is empty"),
    ("sentimnet", r"unknown reward 'sentimnet'.*sentiment, accuracy, format.*module\.path:function"),
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz'.*No module named"),
    ("bad_import_mod:fn", r"cannot import module 'bad_import_mod'.*ZeroDivisionError"),
    ("my_rewards_mod:missing", r"'my_rewards_mod' has no attribute 'missing'"),
    ("my_rewards_mod:NOT_A_FUNCTION", r"'my_rewards_mod:NOT_A_FUNCTION' is a int, not callable"),
    ("nope/rewards.py:fn", r"reward file 'nope/rewards\.py'.*does not exist"),
    ("my_rewards_mod.py:missing", r"'my_rewards_mod\.py' has no attribute 'missing'"),
])
def test_load_errors(tmp_path, monkeypatch, spec, match):
    (tmp_path / "my_rewards_mod.py").write_text(MODULE)
    (tmp_path / "bad_import_mod.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JaxftError, match=match) as e:
        rewards.load(spec)
    assert "\n" not in str(e.value)


def test_weights():
    assert [w for _, _, w in rewards.load("sentiment,format", "")] == [1.0, 1.0]
    assert [w for _, _, w in rewards.load("sentiment,format", " 0.25 , -1 ")] == [0.25, -1.0]
    with pytest.raises(JaxftError, match=r"train.grpo_reward_weights='1,2,3': 3 weights for 2 reward functions \(sentiment, format\)"):
        rewards.load("sentiment,format", "1,2,3")
    with pytest.raises(JaxftError, match=r"'1': 1 weights for 2"):
        rewards.load("sentiment,format", "1")
    with pytest.raises(JaxftError, match=r"'x' is not a number"):
        rewards.load("sentiment,format", "1,x")
    with pytest.raises(JaxftError, match=r"'nan' is not a number"):
        rewards.load("sentiment", "nan")


# --- score ------------------------------------------------------------------------------------------------


def const(values, name="fn"):
    def fn(prompts, completions, completion_ids, **kwargs):
        return values
    fn.__name__ = name
    return fn


def test_score_weighted_sum_and_none():
    a = const([1.0, None, 0.5, None])
    b = const([2, 3, None, None])
    total, per = rewards.score([("a", a, 0.5), ("b", b, 2.0)], ["p"] * 4, ["c"] * 4, [[1]] * 4, {})
    assert total.dtype == np.float32 and per.dtype == np.float32
    assert per.shape == (2, 4)
    np.testing.assert_array_equal(total, np.float32([0.5 * 1 + 2 * 2, 2 * 3, 0.5 * 0.5, 0.0]))
    assert per[0, 0] == 1.0 and math.isnan(per[0, 1]) and per[0, 2] == 0.5 and math.isnan(per[0, 3])
    assert per[1, 0] == 2.0 and per[1, 1] == 3.0 and math.isnan(per[1, 2]) and math.isnan(per[1, 3])


def test_score_builtins_and_arrays():
    completions = ["<think>x</think><answer>1,234</answer>", "great fun", "<think></think><answer>5</answer>"]
    functions = rewards.load("accuracy,format,sentiment", "1,0.5,2") + [
        ("np", const(np.array([1.0, 2.0, 3.0], np.float32)), 1.0)]
    total, per = rewards.score(functions, [""] * 3, completions, [[1, 2]] * 3,
                               {"answer": ["#### 1234", "#### 7", None]})
    np.testing.assert_allclose(per[:3], [[1, 0, np.nan], [1, 0, 1], [0, lex(2, 0), 0]])
    np.testing.assert_allclose(total, [1 + 0.5 + 0 + 1, 0 + 0 + 2 * lex(2, 0) + 2, 0.5 + 0 + 3], rtol=1e-6)


def test_score_passes_columns_trl_style():
    def fn(prompts, completions, **kw):
        assert kw["completion_ids"] == [[5], [6]] and kw["other"] == ["x", None]
        return [float(c == a) for c, a in zip(completions, kw["answer"])]

    total, per = rewards.score([("fn", fn, 3.0)], ["p", "q"], ["yes", "no"], [[5], [6]],
                               {"answer": ["yes", "yes"], "other": ["x", None]})
    np.testing.assert_array_equal(total, [3.0, 0.0])
    np.testing.assert_array_equal(per, [[1.0, 0.0]])


@pytest.mark.parametrize("values, match", [
    ([1.0, 2.0, 3.0], r"reward function 'bad' returned 3 values for 8 completions"),
    ([0.0, 1.0, "2"] + [0.0] * 5, r"reward function 'bad' returned a str at position 2: expected a number or None"),
    ([0.0] * 7 + [math.inf], r"reward function 'bad' returned inf at position 7"),
    ([math.nan] + [0.0] * 7, r"reward function 'bad' returned nan at position 0"),
    (1.0, r"reward function 'bad' returned a float: expected a list of 8"),
    (np.zeros((8, 1)), r"reward function 'bad' returned a ndarray"),
])
def test_score_errors(values, match):
    with pytest.raises(JaxftError, match=r"train\.grpo_rewards: " + match):
        rewards.score([("ok", const([0.0] * 8), 1.0), ("bad", const(values), 1.0)],
                      ["p"] * 8, ["c"] * 8, [[1]] * 8, {})
