"""Preference pairs (`jaxft.data.preference`), DPO (`jaxft.dpo`) and reward models: record formats and
loss masks, the sequence log-likelihoods and both losses and their gradients against transformers +
PyTorch autograd, the memory plan against XLA, and the CLI: log 2 at step 0, held-out pairs learned,
exact resume, 8 devices and micro-batches, one-line errors, a reward model served through PEFT."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_hf import BASE, build_hf
from test_sft import tokenizer_args
from test_train import assert_resumes_exactly, cli, losses

from jaxft import dpo, hf, objectives, plan, sharding
from jaxft.config import base_config
from jaxft.data import iterator, preference, sft, tasks
from jaxft.data.sources import Records, read_file
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.tokenizer import Tokenizer
from forkserver import python_m

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def records(*rows, where="pairs.json"):
    return Records(list(rows), [f"{where}:{i + 1}" for i in range(len(rows))])


# ---------------------------------------------------------------------------------------------
# Records -> arrays


SAME_PAIR = [  # one prompt ("how was it?"), chosen "good", rejected "bad", in every format
    {"conversations": [{"from": "human", "value": "how was it?"}], "chosen": {"from": "gpt", "value": "good"},
     "rejected": {"from": "gpt", "value": "bad"}},
    {"prompt": "how was it?", "chosen": "good", "rejected": "bad"},
    {"prompt": [{"role": "user", "content": "how was it?"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
    {"chosen": [{"role": "user", "content": "how was it?"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "user", "content": "how was it?"}, {"role": "assistant", "content": "bad"}]},
    {"messages": [{"role": "user", "content": "how was it?"}], "chosen": "good", "rejected": "bad"},
]


def test_every_format_gives_the_same_rows_as_sft_with_the_answer_scored(tok_dir):
    tok = Tokenizer(tok_dir)
    r = sft.renderer(tok)
    arrays = [preference.encode(records(row), tok, r, 32)[0] for row in SAME_PAIR]
    for a in arrays[1:]:
        assert a.keys() == arrays[0].keys()
        for k in a:
            np.testing.assert_array_equal(a[k], arrays[0][k], err_msg=k)
    # Each side is what SFT makes of the conversation ending in that answer.
    for prefix, answer in (("", "good"), (preference.REJECTED, "bad")):
        want = sft.padded(sft.examples(records({"instruction": "how was it?", "output": answer}),
                                       tok, r, 32).examples, 32, tok.pad_id)
        for k in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(arrays[0][prefix + k], want[k], err_msg=prefix + k)
    a = arrays[0]
    assert a["loss_mask"].sum() > 0 and a[preference.REJECTED + "loss_mask"].sum() > 0


def test_earlier_answers_are_context_and_the_last_answer_alone_is_scored(tok_dir):
    tok = Tokenizer(tok_dir)
    r = sft.renderer(tok)
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}, {"from": "human", "value": "and?"}]
    row = {"conversations": turns, "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    got = preference.encode(records(row), tok, r, 64)[0]
    whole = sft.examples(records({"conversations": turns + [{"from": "gpt", "value": "good"}]}), tok, r, 64).examples[0]
    ids, mask = np.array(whole[0]), np.array(whole[1])
    runs = np.flatnonzero(np.diff(np.r_[0, mask]) == 1)
    assert len(runs) == 2  # SFT scores both answers
    np.testing.assert_array_equal(got["input_ids"][0, : len(ids)], ids)
    want = mask.copy()
    want[: runs[1]] = 0  # DPO scores the last one only
    np.testing.assert_array_equal(got["loss_mask"][0, : len(ids)], want)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "pairs.json:1: missing field 'rejected'"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "pairs.json:1: 'chosen' and 'rejected' are whole conversations"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}],
      "rejected": "b"}, "pairs.json:1: 'chosen' ends with a user turn, expected the assistant's answer"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "pairs.json:1: empty assistant turn in 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "pairs.json:1: no prompt before the chosen answer"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "pairs.json:1: 'chosen' is not a non-empty list of turns"),
])
def test_bad_records_name_where(tok_dir, row, message):
    tok = Tokenizer(tok_dir)
    with pytest.raises(JaxftError) as e:
        preference.encode(records(row), tok, sft.renderer(tok), 32)
    assert str(e.value).startswith(message), str(e.value)


def test_the_bundled_pairs_are_recognised_as_dpo_not_sft():
    from jaxft.data.sources import ASSETS

    for name in ("dpo_en_demo", "dpo_zh_demo"):
        rec = read_file(ASSETS / "dpo_demo" / f"{name}.json")
        assert len(rec.rows) == 300
        assert tasks.choose_task("", rec, name, "text", None, False) == "dpo"


def test_length_buckets_hold_the_longer_answer():
    n, t = 8, 64
    a = {k: np.zeros((n, t), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    a.update({preference.REJECTED + k: np.zeros((n, t), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")})
    a["attention_mask"][:, :10] = 1
    a[preference.REJECTED + "attention_mask"][:, :40] = 1
    a["weight"] = np.ones((n,), np.float32)
    batch = iterator.Batches(a, 8, 0, buckets=(16, 32, 64)).local(0, (0, 8))
    assert batch["input_ids"].shape[1] == batch[preference.REJECTED + "input_ids"].shape[1] == 64


# ---------------------------------------------------------------------------------------------
# Against transformers and PyTorch autograd


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny Llama (the reference) and the same model moved a little (the policy), in both frameworks."""
    d = tmp_path_factory.mktemp("dpo")
    ref_t, ref_dir = build_hf(d, transformers.LlamaConfig(**{**BASE, "num_key_value_heads": 2}), "LlamaForCausalLM",
                              sub="ref")
    pol_t, pol_dir = build_hf(d, transformers.LlamaConfig(**{**BASE, "num_key_value_heads": 2}), "LlamaForCausalLM",
                              seed=5, sub="policy")
    return (ref_t, *hf.load(str(ref_dir))), (pol_t, *hf.load(str(pol_dir)))


def assert_gradients_match(ours: dict, torch_model, rel: float = 3e-5, every: bool = True):
    """Our gradients by HF name against PyTorch autograd's in `torch_model`, each within `rel` of its
    largest entry; every weight takes part (a non-zero gradient). `every`: the same names on both sides
    (else PyTorch's may be a subset: its tied weights under one name)."""
    theirs = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
    assert ours.keys() == theirs.keys() if every else set(theirs) <= set(ours), set(theirs) ^ set(ours)
    for name in theirs:
        scale = np.abs(theirs[name]).max()
        assert scale > 0, name
        np.testing.assert_allclose(ours[name], theirs[name], atol=rel * scale, err_msg=name)


def pair_batch(pairs=3, t=12, seed=0, vocab=BASE["vocab_size"]):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix in ("", preference.REJECTED):
        ids = rng.integers(3, vocab, size=(pairs, t)).astype(np.int32)
        lengths = rng.integers(6, t + 1, size=pairs)
        mask = (np.arange(t) < lengths[:, None]).astype(np.int32)
        answer = ((np.arange(t) >= lengths[:, None] - rng.integers(2, 5, size=(pairs, 1))) & (mask > 0)).astype(np.int32)
        out.update({prefix + "input_ids": ids * mask, prefix + "attention_mask": mask, prefix + "loss_mask": answer})
    out["weight"] = np.array([1.0] * (pairs - 1) + [0.0], np.float32)  # the last pair is eval padding
    return out


def torch_log_likelihoods(model, batch):
    """[pairs, 2] as TRL computes them: log-softmax of the logits, the next token's, over the answer."""
    out = []
    for prefix in ("", preference.REJECTED):
        ids = torch.tensor(batch[prefix + "input_ids"], dtype=torch.long)
        mask = torch.tensor(batch[prefix + "attention_mask"], dtype=torch.long)
        logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)[:, :-1]
        token = torch.gather(logp, 2, ids[:, 1:, None])[..., 0]
        keep = torch.tensor(batch[prefix + "loss_mask"] * batch[prefix + "attention_mask"])[:, 1:]
        out.append((token * keep).sum(-1))
    return torch.stack(out, -1)


@pytest.mark.parametrize("fused", [True, False])
def test_log_likelihoods_match_transformers(hf_pair, fused):
    (_, _, _), (pol_t, model, params) = hf_pair
    batch = pair_batch()
    outputs = model.apply({"params": params}, **objectives.pair_inputs(batch), return_hidden=fused)
    assert isinstance(outputs, tuple) == fused  # (hidden, embedding): chunked projection; else logits
    got = np.asarray(dpo.log_likelihoods(outputs, batch))
    with torch.no_grad():
        want = torch_log_likelihoods(pol_t, batch).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def trl_loss(x, beta, kind, smoothing):
    """TRL's DPOTrainer.dpo_loss per pair, x = (pi_c - ref_c) - (pi_r - ref_r)."""
    F = torch.nn.functional
    if kind == "ipo":
        return (x - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * x)
    return -F.logsigmoid(beta * x) * (1 - smoothing) - F.logsigmoid(-beta * x) * smoothing


def test_gpt2_log_likelihoods_match_transformers(tmp_path):
    """Another family (learned positions, LayerNorm, GELU, a tied head): the same sums as transformers'."""
    from test_gpt2 import VOCAB, build_hf as build_gpt2

    torch_model, d = build_gpt2(tmp_path)
    model, params = hf.load(str(d))
    batch = pair_batch(vocab=VOCAB)
    got = np.asarray(dpo.log_likelihoods(model.apply({"params": params}, **objectives.pair_inputs(batch),
                                                     return_hidden=True), batch))
    with torch.no_grad():
        want = torch_log_likelihoods(torch_model, batch).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_loss_and_gradients_match_pytorch(hf_pair, kind, smoothing):
    """DPO's losses (TRL's, beta 0.3) and their gradient in every weight, full fine-tuning."""
    (ref_t, ref_model, ref_params), (pol_t, model, params) = hf_pair
    beta, batch = 0.3, pair_batch(4, 16, seed=1)
    mesh = sharding.make_mesh(base_config().mesh, jax.devices()[:1])
    batch = dpo.with_reference(ref_model, ref_params, batch, 4, mesh)
    objective = dpo.objective(beta, kind, smoothing)

    def mean_loss(p):
        sums = objective.loss(model.apply({"params": p}, **objective.inputs(batch), return_hidden=True), batch)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)

    with torch.no_grad():
        ref = torch_log_likelihoods(ref_t, batch)
    np.testing.assert_allclose(batch[dpo.REFERENCE], ref.numpy(), rtol=1e-5, atol=1e-4)
    pol_t.zero_grad(set_to_none=True)  # the model is shared by the parametrised cases
    pol = torch_log_likelihoods(pol_t, batch)
    x = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    w = torch.tensor(batch["weight"])
    want = (trl_loss(x, beta, kind, smoothing) * w).sum() / w.sum()
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    assert float(sums["correct"]) == float(((x > 0) * w).sum())
    ours = family.of(model.cfg).params_to_hf(jax.device_get(grads), model.cfg)
    assert_gradients_match(ours, pol_t, rel=2e-5)


def trl_reference_free(chosen, rejected, beta, kind, smoothing, gamma):
    """Per pair, from the answers' mean token log-probabilities: TRL's CPOTrainer.cpo_loss with
    loss_type="simpo" (cpo_alpha=0), or ORPOTrainer's chosen NLL minus its odds_ratio_loss (beta * log
    sigmoid(log odds ratio), with log1mexp)."""
    F = torch.nn.functional
    if kind == "simpo":
        logits = (chosen - rejected) - gamma / beta
        return -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    log1mexp = lambda x: torch.log(-torch.expm1(x))  # noqa: E731  (x < 0: the mean log-probabilities)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds)


@pytest.mark.parametrize("kind, smoothing", [("simpo", 0.0), ("simpo", 0.2), ("orpo", 0.0)])
def test_reference_free_losses_and_gradients_match_pytorch(hf_pair, kind, smoothing):
    """SimPO's and ORPO's losses (TRL's, beta 0.3, gamma 0.4) on the answers' mean token log-probabilities,
    and their gradient in every weight; no reference pass before training."""
    (_, _, _), (pol_t, model, params) = hf_pair
    beta, gamma, batch = 0.3, 0.4, pair_batch(4, 16, seed=2)
    objective = dpo.objective(beta, kind, smoothing, gamma)
    assert objective.prepare is None

    def mean_loss(p):
        sums = objective.loss(model.apply({"params": p}, **objective.inputs(batch), return_hidden=True), batch)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    pol_t.zero_grad(set_to_none=True)
    tokens = torch.tensor(np.stack([(batch[p + "loss_mask"] * batch[p + "attention_mask"])[:, 1:].sum(-1)
                                    for p in ("", preference.REJECTED)], -1), dtype=torch.float32)
    mean = torch_log_likelihoods(pol_t, batch) / tokens
    w = torch.tensor(batch["weight"])
    want = (trl_reference_free(mean[:, 0], mean[:, 1], beta, kind, smoothing, gamma) * w).sum() / w.sum()
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    assert float(sums["correct"]) == float(((mean[:, 0] > mean[:, 1]) * w).sum())
    if kind == "orpo":
        assert float(sums["nll"]) == pytest.approx(float((-mean[:, 0] * w).sum()), rel=1e-5)
    ours = family.of(model.cfg).params_to_hf(jax.device_get(grads), model.cfg)
    assert_gradients_match(ours, pol_t, rel=2e-5)


def test_cli_orpo_learns_without_a_reference(tmp_path, pairs):
    """ORPO through the CLI: no reference pass, its two terms logged apart, the chosen answers' NLL falls and
    the chosen answer wins more held-out pairs."""
    r = cli(tmp_path / "run", *pairs, "--config.train.dpo_loss=orpo", "--config.train.steps=12",
            "--config.train.dpo_beta=0.2", "--config.export.enabled=False")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dpo train" not in r.stdout
    rows = metrics(tmp_path / "run")
    train = [row for row in rows if "train/nll" in row]
    assert {"train/nll", "train/log_odds_ratio"} <= set(train[0]) and train[-1]["train/nll"] < train[0]["train/nll"]
    evals = [row for row in rows if "eval/loss" in row]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] and evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"]


def test_plan_counts_both_answers_within_15_percent_of_xla():
    from test_plan import compiled_bytes, config

    c = config("lora", "none", 1, data__task="dpo")
    s = plan.setup(c, 1)
    assert s.sequences == 2
    b = c.train.batch_size

    def rejected(s, ids):
        rows = jax.ShapeDtypeStruct((b, 2), jnp.float32, sharding=sharding.batch_sharding(
            sharding.make_mesh(c.mesh, jax.devices()[:1]), 1))
        return {"loss_mask": ids, **{preference.REJECTED + k: ids for k in ("input_ids", "attention_mask", "loss_mask")},
                dpo.REFERENCE: rows}

    want = compiled_bytes(c, 1, extra=rejected, objective=dpo.objective(0.1))
    got = plan.estimate(s)
    assert got["total"] == pytest.approx(want, rel=0.15), (got, want)
    single = plan.estimate(plan.setup(config("lora", "none", 1, data__task="sft"), 1))
    assert got["activations"] > 1.8 * single["activations"]


# ---------------------------------------------------------------------------------------------
# The command line


def preference_file(path, n, seed):
    """Pairs a model can learn: chosen answers are praise, rejected ones criticism (English and Chinese)."""
    good, bad = {0: "good charming funny very".split(), 1: list("好看喜欢")}, {0: "bad boring not".split(), 1: list("不")}
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        lang, sep = i % 2, " " if i % 2 == 0 else ""
        pick = lambda words: sep.join(words[j] for j in rng.randint(0, len(words), rng.randint(2, 5)))  # noqa: E731
        rows.append({"conversations": [{"from": "human", "value": "the movie ?" if lang == 0 else "电影"}],
                     "chosen": {"from": "gpt", "value": pick(good[lang])},
                     "rejected": {"from": "gpt", "value": pick(bad[lang])}})
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tok_dir):
    p = preference_file(tmp_path_factory.mktemp("pairs") / "pairs.json", 160, 0)
    return (f"--config.data.name={p}", "--config.data.eval_holdout=32", "--config.data.seq_len=32",
            "--config.train.batch_size=8", "--config.method.name=full", "--config.optimizer.learning_rate=1e-3",
            "--config.optimizer.schedule=constant", "--config.train.dpo_beta=0.5", "--config.train.log_every_steps=1",
            "--config.checkpoint.every_steps=15", "--config.eval.at_start=True", *tokenizer_args(tok_dir))


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cli_dpo_starts_at_log_2_learns_and_resumes_exactly(tmp_path, pairs):
    straight = tmp_path / "straight"
    r = cli(straight, *pairs, "--config.train.steps=30")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dpo" in r.stdout and "128 preference pairs" in r.stdout  # data.task found from the fields
    rows = [row for row in metrics(straight) if "eval/loss" in row]
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval/reward_margin"] == pytest.approx(0, abs=1e-6) and "eval/perplexity" not in before
    assert after["step"] == 30 and after["eval/accuracy"] >= 0.9 and after["eval/loss"] < 0.5 * math.log(2), after
    assert after["eval/reward_margin"] == pytest.approx(after["eval/rewards_chosen"] - after["eval/rewards_rejected"])
    # Killed after the checkpoint of step 15 (a copy of the run, the last checkpoint removed) and run again to
    # 30: the reference is computed again, the same, and so are the steps.
    assert_resumes_exactly(straight, tmp_path / "split", (*pairs, "--config.train.steps=30"), 15, 30)


@pytest.fixture(scope="module")
def dpo_four_steps(tmp_path_factory, pairs):
    """One 4-step DPO run on one device that generates in its evals, paid for once: its answers are
    test_cli_dpo_generates_for_held_out_prompts_and_evaluate_scores_them's, and its figures the one-device side
    of test_eight_devices_and_micro_batches_match_one_device."""
    wd = tmp_path_factory.mktemp("dpo4") / "run"
    run = (*pairs, "--config.train.steps=4", "--config.eval.generate_examples=6", "--config.eval.max_new_tokens=8",
           "--config.eval.at_start=False", "--config.export.enabled=False")
    r = cli(wd, *run, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return wd, run


def test_cli_dpo_generates_for_held_out_prompts_and_evaluate_scores_them(tmp_path, pairs, dpo_four_steps):
    """eval.generate_examples on DPO: answers to the held-out pairs' distinct prompts, ROUGE against their
    chosen answers (as SFT's eval: the conversation ending in the chosen answer), samples written; jaxft.evaluate
    gives the same scores from the checkpoint (it cannot give the DPO loss: no reference there)."""
    from test_evaluate import cli as evaluate_cli

    wd, run = dpo_four_steps
    final = [row for row in metrics(wd) if "eval/rougeL" in row][-1]
    assert final["step"] == 4 and "eval/loss" in final and "eval/bleu" in final
    samples = [json.loads(line) for line in (wd / "samples" / "step_4.jsonl").read_text().splitlines()]
    # the pairs share two prompts (English and Chinese): each generated once, against all its chosen answers
    held_out = json.loads(open(pairs[0].split("=", 1)[1]).read())[-32:]
    assert len(samples) == 2 and "movie ?" in samples[0]["prompt"] and "电影" in samples[1]["prompt"]
    for i, sample in enumerate(samples):
        assert sample["reference"] == [row["chosen"]["value"] for row in held_out[i::2]]
    r = evaluate_cli("--config=configs/tiny_test.py", *run, f"--checkpoint={wd}", f"--out={tmp_path / 'eval'}",
                     "--max_examples=6")
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert "eval/loss" not in scores and scores["eval/rougeL"] == pytest.approx(final["eval/rougeL"], abs=1e-9)


def test_cli_bad_pair_is_one_line(tmp_path, pairs):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    r = cli(tmp_path / "run", *pairs, f"--config.data.name={p}", "--config.data.eval_holdout=0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {p}:2: missing field 'rejected'"), r.stderr
    assert not (tmp_path / "run").exists()
    for bad, message in ((("--config.train.dpo_beta=0",), "train.dpo_beta=0.0: expected > 0"),
                         (("--config.train.dpo_loss=kto",), "train.dpo_loss='kto': expected one of 'sigmoid', 'ipo'"),
                         (("--config.train.dpo_label_smoothing=0.5",), "train.dpo_label_smoothing=0.5: expected 0 <="),
                         (("--config.train.dpo_loss=ipo", "--config.train.dpo_label_smoothing=0.1"),
                          "train.dpo_label_smoothing=0.1: applies to train.dpo_loss='sigmoid' or 'simpo', not 'ipo'")):
        r = cli(tmp_path / "run", *pairs, *bad)
        assert r.returncode == 2 and r.stderr.startswith("error: " + message), r.stderr
    assert not (tmp_path / "run").exists()


# slow: configs/reward_lora.py runs, is asserted the same way and exports in
# test_grpo.py::test_cli_grpo_on_a_trained_reward_models_export (whose GRPO run reads its export).
@pytest.mark.parametrize("name", ["dpo_lora.py", pytest.param("reward_lora.py", marks=pytest.mark.slow)])
def test_preference_configs_run_and_export(tmp_path, name):
    # 2 steps of 8 pairs: 8 training and 4 held-out pairs of each source (24 and 8 cost 3 s more: the reference
    # pass and the evaluations)
    r = cli(tmp_path, "--config.train.steps=2", "--config.data.max_train_examples=8", "--config.data.eval_holdout=4",
            "--config.data.seq_len=64", "--config.eval.every_steps=0",
            "--config.optimizer.warmup_steps=0", config=f"configs/{name}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: eval/loss=" in r.stdout and "done:" in r.stdout and "eval/reward_margin=" in r.stdout
    if name == "dpo_lora.py":
        assert "step 0: eval/loss=0.6931 eval/accuracy=0.0000" in r.stdout  # the policy is its reference
    assert (tmp_path / "export" / "adapter_model.safetensors").exists()


def test_eight_devices_and_micro_batches_match_one_device(tmp_path, pairs, dpo_four_steps):
    """The reference pass feeds each device its rows; micro-batches keep each pair's two answers together.
    (The one-device run, `dpo_four_steps`, also generates in its final eval: that does not touch the figures.)"""
    run = (*pairs, "--config.train.steps=4", "--config.export.enabled=False", "--config.eval.at_start=False")
    one, eight = dpo_four_steps[0], tmp_path / "eight"
    r = cli(eight, *run, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.train.grad_accum=2", "--config.eval.batch_size=16", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = losses(one), losses(eight)
    assert got.keys() == ref.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in ref], rtol=2e-5)
    final = lambda wd: [row for row in metrics(wd) if "eval/loss" in row][-1]  # noqa: E731
    assert final(eight)["eval/loss"] == pytest.approx(final(one)["eval/loss"], rel=2e-5)


# ---------------------------------------------------------------------------------------------
# Reward models (data.task=reward): the same pairs, a one-output classifier, Bradley-Terry


def test_reward_model_loss_and_gradients_match_pytorch(tmp_path):
    config = transformers.LlamaConfig(**{**BASE, "num_key_value_heads": 2, "num_labels": 1, "pad_token_id": 0})
    torch_model, d = build_hf(tmp_path, config, "LlamaForSequenceClassification")
    model, params = hf.load(str(d))
    assert model.cfg.head == "classification" and model.cfg.num_labels == 1
    batch = pair_batch(4, 16, seed=2)  # right-padded with id 0 (the pad id): HF's classifier finds the last token so
    objective = objectives.for_task("reward")

    def mean_loss(p):
        sums = objective.loss(model.apply({"params": p}, **objective.inputs(batch)), batch)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    r = [torch_model(torch.tensor(batch[p + "input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(batch[p + "attention_mask"])).logits[:, 0]
         for p in ("", preference.REJECTED)]
    w = torch.tensor(batch["weight"])
    want = (-torch.nn.functional.logsigmoid(r[0] - r[1]) * w).sum() / w.sum()  # TRL's RewardTrainer loss
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    assert float(sums["correct"]) == float(((r[0] > r[1]) * w).sum())
    ours = family.of(model.cfg).params_to_hf(jax.device_get(grads), model.cfg)
    for name, p in torch_model.named_parameters():
        scale = np.abs(p.grad.numpy()).max()
        assert scale > 0, name
        np.testing.assert_allclose(ours[name], p.grad.numpy(), atol=2e-5 * scale, err_msg=name)


def test_cli_reward_model_learns_exports_and_serves_with_peft(tmp_path, pairs):
    from peft import PeftModel

    data = pairs[0]
    run = tmp_path / "run"
    r = cli(run, data, "--config.data.task=reward", "--config.data.eval_holdout=32", "--config.data.seq_len=32",
            "--config.train.batch_size=8", "--config.train.steps=12", "--config.model.pooling=last",
            # lr 1e-2 and 2 warmup steps, not the config's 3e-3 over 30: the held-out loss falls from 0.74 to 0.02
            # (accuracy 0.41 -> 1.0) in 12 steps, where 40 of the config's schedule reached 0.01
            "--config.optimizer.learning_rate=1e-2", "--config.optimizer.warmup_steps=2",
            "--config.eval.at_start=True", "--config.eval.every_steps=0", "--config.checkpoint.every_steps=0",
            config="configs/lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "new classification head score/kernel (256, 1)" in r.stdout
    rows = [row for row in metrics(run) if "eval/loss" in row]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 12
    assert rows[-1]["eval/accuracy"] >= 0.9 and rows[-1]["eval/loss"] < 0.5 * rows[0]["eval/loss"], rows
    assert "eval/perplexity" not in rows[-1] and rows[-1]["eval/reward_margin"] > 0

    # Served as a PEFT user would: transformers' one-output classifier + the adapter; the same rewards.
    export = run / "export"
    adapter = json.loads((export / "adapter_config.json").read_text())
    torch_base = transformers.AutoModelForSequenceClassification.from_pretrained(
        adapter["base_model_name_or_path"], num_labels=1)
    served = PeftModel.from_pretrained(torch_base, export).eval()
    model, params = hf.load(adapter["base_model_name_or_path"], adapter=str(export))
    tok = Tokenizer(hf.resolve("jaxft-tiny"))
    ev = preference.encode(records(*json.loads(open(data.split("=", 1)[1]).read())[-32:]), tok,
                           sft.renderer(tok), 32)[0]
    ours = np.asarray(model.apply({"params": params}, **objectives.pair_inputs(ev)))[:, 0]
    with torch.no_grad():
        theirs = np.concatenate([served(input_ids=torch.tensor(ev[p + "input_ids"], dtype=torch.long),
                                        attention_mask=torch.tensor(ev[p + "attention_mask"])).logits[:, 0].numpy()
                                 for p in ("", preference.REJECTED)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    chosen, rejected = ours.reshape(2, -1)
    assert np.mean(chosen > rejected) == pytest.approx(rows[-1]["eval/accuracy"])

    # jaxft.evaluate on the export: the same figures as training's last eval.
    out = tmp_path / "eval"
    e = python_m("jaxft.evaluate", "--config=configs/lora.py", f"--checkpoint={export}", f"--out={out}", data,
                 "--config.data.task=reward", "--config.data.eval_holdout=32", "--config.data.seq_len=32",
                 "--config.model.pooling=last")
    assert e.returncode == 0, e.stderr[-3000:]
    scores = json.loads((out / "metrics.json").read_text())["metrics"]
    for k in ("eval/loss", "eval/accuracy", "eval/reward_margin"):
        assert scores[k] == pytest.approx(rows[-1][k], rel=1e-4, abs=1e-6), k


# slow (method x objective): P-Tuning v2's prefix in the policy and in its reference (the KL 0 at step 1) is
# trained by GRPO in test_grpo.py::test_other_methods_train_grpo[ptuning_v2]; IA3 and QLoRA stay here.
@pytest.mark.parametrize("method", [
    pytest.param(("--config.method.name=ptuning_v2", "--config.method.num_virtual_tokens=4"),  # the reference holds
                 marks=pytest.mark.slow),  # its prompts
    ("--config.method.name=ia3",),
    ("--config.method.name=lora", "--config.model.quantization=nf4", "--config.optimizer.learning_rate=1e-2"),  # QLoRA
])
def test_other_methods_train_dpo(tmp_path, pairs, method):
    r = cli(tmp_path, *pairs, *method, "--config.train.steps=20", "--config.eval.every_steps=0",
            "--config.export.enabled=False", "--config.checkpoint.every_steps=0", "--config.optimizer.learning_rate=1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in metrics(tmp_path) if "eval/loss" in row]
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the policy is the reference
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] and rows[-1]["eval/reward_margin"] > 0, rows[-1]
