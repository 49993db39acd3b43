"""GRPO (`jaxft.grpo`) and its prompts (`jaxft.data.prompts`): prompt formats, per-token log-probabilities
against transformers, the loss, KL and clip ratio and their gradients against TRL's formulas in PyTorch
autograd, group advantages against TRL's, the memory plan, and the CLI: the reward rises on held-out
prompts, exact resume (also with several iterations per batch), 8 devices and micro-batches, one-line
errors, other methods."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_hf import BASE
from test_preference import assert_gradients_match, hf_pair  # noqa: F401  (hf_pair: a fixture)
from test_sft import tokenizer_args
from test_train import ROOT, assert_resumes_exactly, cli

from jaxft import grpo, objectives
from jaxft.config import base_config
from jaxft.data import prompts, sft
from jaxft.data.sources import Records
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.tokenizer import Tokenizer
from forkserver import python_m

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def records(*rows, where="prompts.jsonl"):
    return Records(list(rows), [f"{where}:{i + 1}" for i in range(len(rows))])


# ---------------------------------------------------------------------------------------------
# Records -> prompts


def test_prompt_formats(tok_dir):
    tok = Tokenizer(tok_dir)
    r = sft.renderer(tok)
    user = [{"role": "user", "content": "how was it?"}]
    templated = tok.encode_special(r(user, add_generation_prompt=True))
    rows = [
        {"prompt": user},  # conversational: the template and its generation prompt
        {"instruction": "how was it?"},  # Alpaca without an answer
        {"instruction": "how was it?", "output": "good", "answer": "good"},  # the answer stays a column
        {"messages": user + [{"role": "assistant", "content": "good"}]},  # the last answer is dropped
        {"conversations": [{"from": "human", "value": "how was it?"}]},
    ]
    arrays, counts, values = prompts.encode(records(*rows), tok, r, 64, "text")
    assert counts.skipped == counts.truncated == 0 and list(arrays["record"]) == [0, 1, 2, 3, 4]
    for i in range(len(rows)):
        n = int(arrays["attention_mask"][i].sum())
        assert list(arrays["input_ids"][i, 64 - n:]) == templated, rows[i]  # left-padded
        assert not arrays["attention_mask"][i, : 64 - n].any() and (arrays["input_ids"][i, : 64 - n] == tok.pad_id).all()
        assert values[i] == user
    # data.source_field / target_field (GSM8K's question and answer): the question, the answer a column

    arrays, _, values = prompts.encode(records({"question": "how was it?", "answer": "#### 1"}), tok, r, 64, "text",
                                       sft.Fields("question", "answer"))
    assert list(arrays["input_ids"][0][arrays["attention_mask"][0] > 0]) == templated and values == [user]
    # A text prompt is used as it is (TRL's standard format); a document gets BOS and its beginning.
    arrays, counts, values = prompts.encode(records({"prompt": "the movie is"}, {"text": "a b c d e f g h i j k"}), tok,
                                            r, 6, "text")
    assert list(arrays["input_ids"][0][arrays["attention_mask"][0] > 0]) == tok.encode_special("the movie is")[-6:]
    doc = [tok.bos_id] + tok.encode("a b c d e f g h i j k")
    assert list(arrays["input_ids"][1]) == doc[:6] and counts.truncated == 2
    assert values[0] == "the movie is" and values[1] == tok.decode(doc[1:6]).strip()
    long = " ".join(["word"] * 40)
    arrays = prompts.encode(records({"prompt": long}), tok, r, 8, "text")[0]
    assert list(arrays["input_ids"][0]) == tok.encode_special(long)[-8:]  # a prompt keeps its end


@pytest.mark.parametrize("row, message", [
    ({"prompt": ""}, "prompts.jsonl:1: empty 'prompt'"),
    ({"label": 1}, "prompts.jsonl:1: no prompt: expected a 'prompt' field"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "prompts.jsonl:1: no prompt before the answer"),
    ("text", "prompts.jsonl:1: expected a JSON object, got str"),
])
def test_bad_prompt_records_name_where(tok_dir, row, message):
    tok = Tokenizer(tok_dir)
    with pytest.raises(JaxftError, match="^" + message):
        prompts.encode(records(row), tok, sft.renderer(tok), 16, "text")
    arrays, counts, values = prompts.encode(records(row, {"prompt": "ok"}), tok, sft.renderer(tok), 16, "text",
                                            skip_bad=True)
    assert counts.skipped == 1 and list(arrays["record"]) == [1] and values == [None, "ok"]


# ---------------------------------------------------------------------------------------------
# Against transformers, TRL's formulas and PyTorch autograd


def experience(rows=6, prompt=5, new=7, seed=0, vocab=BASE["vocab_size"]):
    """Left-padded prompts and completions that end at an EOS (or run to the end), as a rollout makes them."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(2, prompt + 1, size=rows)
    p_mask = (np.arange(prompt) >= prompt - p_len[:, None]).astype(np.int32)
    c_len = rng.integers(1, new + 1, size=rows)
    c_mask = (np.arange(new) < c_len[:, None]).astype(np.int32)
    ids = rng.integers(3, vocab, size=(rows, prompt + new)).astype(np.int32)
    mask = np.concatenate([p_mask, c_mask], 1)
    return {"input_ids": ids * mask, "attention_mask": mask,
            "loss_mask": np.concatenate([np.zeros_like(p_mask), c_mask], 1),
            "weight": np.ones((rows,), np.float32),
            "advantages": rng.normal(size=rows).astype(np.float32)}


def torch_token_log_probs(model, batch, temperature=1.0):
    """[rows, T - 1] as TRL's `_get_per_token_logps`: log-softmax of logits / temperature, the next token's.
    Positions are those of HF's; a left-padded row's positions count real tokens only."""
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions).logits.float()[:, :-1] / temperature
    return torch.gather(torch.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("fused, temperature", [(True, 1.0), (False, 1.0), (True, 0.7)])
def test_token_log_probs_match_transformers(hf_pair, fused, temperature):  # noqa: F811
    (_, _, _), (pol_t, model, params) = hf_pair
    batch = experience()
    outputs = model.apply({"params": params}, **objectives.model_inputs(batch), return_hidden=fused)
    got = np.asarray(grpo.token_log_probs(outputs, batch, temperature))[:, :-1]
    with torch.no_grad():
        want = torch_token_log_probs(pol_t, batch, temperature).numpy()
    keep = np.asarray(objectives.next_token(batch["attention_mask"] * batch["loss_mask"]))[:, :-1] > 0
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-4)


def trl_grpo_loss(logp, old, ref, advantages, mask, beta, epsilon, loss_type="dapo", max_new_tokens=0):
    """TRL's GRPOTrainer._compute_loss: dapo, the sum over every completion token / their count; grpo,
    the mean over completions of each one's token mean; dr_grpo, the sum / (completions x max_new_tokens).
    (KL and clip ratio: averaged the same way.)"""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + beta * kl
    low = (coef_1 < 1 - epsilon) & (advantages[:, None] < 0)
    high = (coef_1 > 1 + epsilon) & (advantages[:, None] > 0)

    def mean(x):
        if loss_type == "grpo":
            rows = mask.sum(-1) > 0
            return ((x * mask).sum(-1)[rows] / mask.sum(-1)[rows]).mean()
        if loss_type == "dr_grpo":
            return (x * mask).sum() / ((mask.sum(-1) > 0).sum() * max_new_tokens)
        return (x * mask).sum() / mask.sum()

    return mean(per_token), mean(kl), mean((low | high).float())


@pytest.mark.parametrize("iterations, loss_type", [(1, "dapo"), (2, "dapo"), (2, "grpo"), (1, "dr_grpo")])
def test_loss_and_gradients_match_pytorch(hf_pair, iterations, loss_type):  # noqa: F811
    """GRPO's loss, KL and clip ratio, and the gradient in every weight (full fine-tuning), against TRL's
    formulas in PyTorch: with one iteration pi_old is pi (detached); with two, the sampler's log-probs,
    here another policy's (the reference moved), so that some ratios leave the clip range."""
    (ref_t, ref_model, ref_params), (pol_t, model, params) = hf_pair
    s = grpo.Settings(beta=0.3, epsilon=0.05, iterations=iterations, rewards="sentiment", loss_type=loss_type,
                      max_new_tokens=8)
    batch = experience(8, 6, 8, seed=1)
    batch["weight"][-1] = 0.0  # an eval padding row counts nothing
    ref_logps = lambda p: grpo.token_log_probs(  # noqa: E731
        ref_model.apply({"params": p}, **objectives.model_inputs(batch), return_hidden=True), batch)
    batch["ref_logps"] = ref_logps(ref_params)
    if iterations > 1:
        batch["old_logps"] = ref_logps(jax.tree_util.tree_map(lambda x: x * 1.02, ref_params))
    objective = grpo.objective(s)

    def mean_loss(p):
        sums = objective.loss(model.apply({"params": p}, **objective.inputs(batch), return_hidden=True), batch)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)

    w = torch.tensor(objectives.next_token(batch["attention_mask"] * batch["loss_mask"])[:, :-1] *
                     batch["weight"][:, None], dtype=torch.float32)
    with torch.no_grad():
        ref = torch_token_log_probs(ref_t, batch)
    np.testing.assert_allclose(np.asarray(batch["ref_logps"])[:, :-1][w > 0], ref.numpy()[w > 0], rtol=1e-5, atol=1e-4)
    pol_t.zero_grad(set_to_none=True)
    logp = torch_token_log_probs(pol_t, batch)
    old = torch.tensor(np.asarray(batch["old_logps"])[:, :-1]) if iterations > 1 else logp.detach()
    want, kl, clip = trl_grpo_loss(logp, old, ref, torch.tensor(batch["advantages"]), w, s.beta, s.epsilon, loss_type,
                                   s.max_new_tokens)
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert float(sums["kl"] / sums["count"]) == pytest.approx(kl.item(), rel=1e-5, abs=1e-7) and kl.item() > 0
    assert float(sums["clip_ratio"] / sums["count"]) == pytest.approx(clip.item(), abs=1e-6)
    assert (clip.item() > 0) == (iterations > 1)
    ours = family.of(model.cfg).params_to_hf(jax.device_get(grads), model.cfg)
    assert_gradients_match(ours, pol_t)


def test_advantages_match_trl():
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0], np.float32)
    r = torch.tensor(rewards).view(-1, 4)
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)  # torch's std: unbiased
    np.testing.assert_allclose(grpo.advantages(rewards, 4), ((r - mean) / (std + 1e-4)).view(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(grpo.advantages(rewards, 4, scale=False), (r - mean).view(-1).numpy(), rtol=1e-6)
    assert not grpo.advantages(rewards, 4)[4:8].any()  # a group that all scored alike teaches nothing


def test_completion_mask_ends_at_the_first_eos():
    new = np.array([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    np.testing.assert_array_equal(grpo.completion_mask(new, np.array([2])), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_plan_counts_every_completion_row_within_15_percent_of_xla():
    """batch_size prompts of seq_len tokens plan as batch_size x G rows of seq_len + max_new_tokens."""
    from test_plan import compiled_bytes, config

    from jaxft import plan, sharding

    c = config("lora", "none", 1, data__task="grpo", train__grpo_rewards="sentiment", data__seq_len=64,
               train__batch_size=4, train__grpo_max_new_tokens=64)
    s = plan.setup(c, 1)
    assert s.sequences == 4 and s.length == 128
    rows = config("lora", "none", 1, data__task="grpo", train__grpo_rewards="sentiment", data__seq_len=128,
                  train__batch_size=16)  # what the step sees: 4 x 4 rows of 64 + 64 tokens

    def made(s, ids):
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
        floats = lambda shape, n: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding.batch_sharding(mesh, n))  # noqa: E731
        return {"loss_mask": ids, "advantages": floats((16,), 1), "ref_logps": floats(ids.shape, 2)}

    # the train step's, and the reference policy the rollouts keep: a copy of the trainable leaves
    reference = sum(np.prod(x.shape) * x.dtype.itemsize for p, x in s.abstract.items() if s.trainable[p])
    assert s.reference and reference > 0
    want = compiled_bytes(rows, 1, extra=made, objective=grpo.objective(grpo.settings(c.train))) + reference
    got = plan.estimate(s)
    assert got["total"] == pytest.approx(want, rel=0.15), (got, want)


# ---------------------------------------------------------------------------------------------
# The command line

REWARD = '''
def low_ids(prompts, completions, completion_ids, **columns):
    """The share of an 8-token completion budget spent on token ids 3..59 (EOS is 2)."""
    assert len(columns["id"]) == len(prompts)  # the records' other fields come as columns (TRL's)
    return [sum(3 <= t < 60 for t in ids) / 8 for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("grpo")
    rng = np.random.default_rng(0)
    words = "the movie was good bad long short fun dull a an it is".split()
    (d / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(rng.choice(words, rng.integers(2, 7))), "id": i}) + "\n" for i in range(200)))
    (d / "reward.py").write_text(REWARD)
    return (f"--config.data.name={d / 'prompts.jsonl'}", "--config.data.task=grpo", "--config.data.eval_holdout=16",
            "--config.data.seq_len=16", f"--config.train.grpo_rewards={d / 'reward.py'}:low_ids",
            "--config.train.grpo_max_new_tokens=8", "--config.eval.max_new_tokens=8", "--config.method.name=full",
            "--config.optimizer.learning_rate=3e-3", "--config.optimizer.schedule=constant",
            "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=10", *tokenizer_args(tok_dir))


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_figures(one, other, rel=2e-5, abs=1e-6):
    """Two runs' metrics.jsonl: the same rows and figures (speed aside), within `rel` or `abs`."""
    ref, got = metrics(one), metrics(other)
    assert len(ref) == len(got) > 2
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            if "per_second" not in k and "mfu" not in k:
                assert b[k] == pytest.approx(a[k], rel=rel, abs=abs), (a["step"], k)


def assert_eight_devices_match_one(tmp_path, go, one=None, **tolerance):
    """`go` on 1 device (or `one`, a finished run of it) and on a 2 x 2 x 2 mesh with two micro-batches: the
    same figures (`assert_same_figures`)."""
    eight = tmp_path / "eight"
    if one is None:
        one = tmp_path / "one"
        assert cli(one, *go, "--config.mesh.data=1").returncode == 0
    r = cli(eight, *go, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.train.grad_accum=2", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_figures(one, eight, **tolerance)


def evaluated_reward(tmp_path, args, checkpoint) -> float:
    """eval/reward of jaxft.evaluate on `checkpoint`, the run's config being tiny_test + `args`."""
    r = python_m("jaxft.evaluate", "--config=configs/tiny_test.py", *args, f"--checkpoint={checkpoint}",
                 f"--out={tmp_path / 'eval'}", env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["eval/reward"]


def test_cli_reward_rises_and_resumes_exactly(tmp_path, run):
    """12 steps: eval/reward 0.33 at the start, 0.61 at step 6, 0.98 at 8, 1.0 from 10 (measured with eval every
    2 steps)."""
    go = (*run, "--config.train.steps=12")  # checkpoints at 10 and 12
    straight = tmp_path / "straight"
    r = cli(straight, *go, "--config.eval.at_start=True")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(straight)
    evals = [row for row in rows if "eval/reward" in row]
    assert evals[0]["step"] == 0 and evals[0]["eval/reward"] < 0.5 and evals[-1]["eval/reward"] >= 0.9, evals
    first = next(row for row in rows if "train/loss" in row)
    assert first["step"] == 1 and first["train/kl"] == 0  # the policy starts as its reference
    assert first["train/completion_length"] == 8 and 0 <= first["train/reward"] <= 1 and "train/accuracy" not in first
    samples = [json.loads(line) for line in (straight / "samples" / "step_12.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {"prompt", "completion", "reward"} <= set(samples[0])
    assert (straight / "export" / "model.safetensors").exists()
    # jaxft.evaluate scores the checkpoint, and the export, as training's eval did.
    for checkpoint in (straight, straight / "export"):
        assert evaluated_reward(tmp_path, run, checkpoint) == pytest.approx(evals[-1]["eval/reward"], abs=1e-6)
    # Killed after the checkpoint of step 10 (a copy of the run, the last checkpoint removed) and run again to
    # 12: the same completions are drawn, so the same steps follow. (A finished shorter run trained on further
    # is tested on SFT, test_sft.py::test_cli_sft_mixture_learns_and_resumes_exactly.)
    assert_resumes_exactly(straight, tmp_path / "split", go, 10, 12)


def test_cli_several_iterations_per_batch_resume_exactly(tmp_path, run):
    """grpo_iterations=2: each batch of completions trains two steps; the second's ratios move off 1."""
    it = (*run, "--config.train.grpo_iterations=2", "--config.train.grpo_epsilon=0.01",
          "--config.optimizer.learning_rate=1e-2", "--config.export.enabled=False", "--config.checkpoint.every_steps=2",
          "--config.train.steps=4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(straight, *it).returncode == 0
    rows = {row["step"]: row for row in metrics(straight) if "train/loss" in row}
    assert all(rows[s]["train/clip_ratio"] == 0 for s in range(1, 5, 2))  # pi_old is pi: ratio 1
    assert any(rows[s]["train/clip_ratio"] > 0 for s in range(2, 5, 2))
    assert all(rows[s]["train/reward"] == rows[s + 1]["train/reward"] for s in range(1, 5, 2))  # one batch, 2 steps
    # killed after the checkpoint of step 2, between two batches of completions (a copy of the run, the last
    # checkpoint removed), and run again
    assert_resumes_exactly(straight, split, it, 2, 4)


def sharded(run):
    """2 steps (the second's completions from the trained policy, its KL to the reference not 0), an eval
    before and after: the run that test_eight_devices_and_micro_batches_match_one_device and
    test_two_processes_match_one spread over devices and processes."""
    return (*run, "--config.train.steps=2", "--config.export.enabled=False", "--config.eval.batch_size=16",
            "--config.eval.at_start=True")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, run):
    """`sharded(run)` on one device: what the 8-device and the two-process runs match."""
    one = tmp_path_factory.mktemp("grpo_one") / "one"
    r = cli(one, *sharded(run), "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return one


def test_eight_devices_and_micro_batches_match_one_device(tmp_path, run, one_device):
    """Prompts spread over the devices, each group of completions on the devices of its prompt."""
    assert_eight_devices_match_one(tmp_path, sharded(run), one=one_device)
    # The one-device run is also test_cli_truncated_completions_can_be_left_out_of_the_loss's unmasked case
    # (train.grpo_mask_truncated=False, the default): its steps 1 and 2 are that test's 2-step run (a constant
    # schedule; evals do not touch training), every completion truncated, and yet they train.
    rows = [row for row in metrics(one_device) if "train/loss" in row][:2]
    assert [row["step"] for row in rows] == [1, 2] and all(row["train/clipped_completions"] == 1 for row in rows)
    assert all(row["train/grad_norm"] != 0 for row in rows), rows


@pytest.mark.parametrize("bad, message", [
    (("--config.train.grpo_rewards=",), "train.grpo_rewards is empty"),
    (("--config.train.grpo_rewards=nosuch",), "train.grpo_rewards"),
    (("--config.train.grpo_generations=1",), "train.grpo_generations=1: expected an integer >= 2"),
    (("--config.train.grpo_temperature=0",), "train.grpo_temperature=0.0: expected > 0"),
    (("--config.train.grpo_iterations=3",), "train.steps=4: expected a multiple of train.grpo_iterations=3"),
    (("--config.train.grpo_reward_weights=1,2",), "train.grpo_reward_weights='1,2': 2 weights for 1 reward"),
    (("--config.train.grpo_loss_type=bnpo",), "train.grpo_loss_type=bnpo: expected one of 'dapo', 'grpo', 'dr_grpo'"),
])
def test_cli_bad_settings_are_one_line(tmp_path, run, bad, message):
    r = cli(tmp_path / "run", *run, "--config.train.steps=4", *bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + message), r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_truncated_completions_can_be_left_out_of_the_loss(tmp_path, run):
    """The random tiny policy never says EOS in 8 tokens: with grpo_mask_truncated nothing trains. (Without
    it, the default, they train: asserted on `one_device`, the run test_eight_devices_and_micro_batches_match_one_
    device and test_two_processes_match_one compare, which pays for that run anyway.)"""
    go = (*run, "--config.train.steps=2", "--config.export.enabled=False", "--config.data.eval_holdout=0")  # no eval
    assert cli(tmp_path, *go, "--config.train.grpo_mask_truncated=True").returncode == 0
    rows = [row for row in metrics(tmp_path) if "train/loss" in row]
    assert len(rows) == 2 and all(row["train/clipped_completions"] == 1 for row in rows)
    assert all(row["train/grad_norm"] == 0 for row in rows), rows


def test_cli_bad_prompt_record_is_one_line(tmp_path, run):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a b"}\n{"prompt": ""}\n')
    r = cli(tmp_path / "run", *run, f"--config.data.name={p}", "--config.data.eval_holdout=0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {p}:2: empty 'prompt'"), r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_reward_function_that_fails_is_one_line_before_anything_is_written(tmp_path, run):
    f = tmp_path / "r.py"
    f.write_text("def no_kwargs(prompts, completions):\n    return [0.0] * len(prompts)\n"
                 "def short(prompts, completions, **kw):\n    return []\n")
    for name, message in (("no_kwargs", "train.grpo_rewards: reward function 'no_kwargs' failed when called with the "
                                        "prompt of "),
                          ("short", "train.grpo_rewards: reward function 'short' returned 0 values for 1 completions")):
        r = cli(tmp_path / "run", *run, f"--config.train.grpo_rewards={f}:{name}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + message), r.stderr
        assert not (tmp_path / "run").exists()


def test_two_processes_match_one(tmp_path, run, one_device):
    """Two processes of 2 devices (data 2 x fsdp 2): each completes and scores its own prompts' groups; the
    losses, rewards and evals of one process on one device (`one_device`, which the 8-device run matches
    too). Measured: every figure within 0.004 of assert_same_figures' tolerance, and bit for bit those of
    one 4-device process on the same mesh."""
    from test_sharding import free_port

    two, port = tmp_path / "two", free_port()
    procs = [cli(two, *sharded(run), "--config.mesh.data=2", "--config.mesh.fsdp=2",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", devices=2,
                 wait=False) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    assert_same_figures(one_device, two)


# slow: IA3 (no prefix; it generates as LoRA does) trains a preference objective with a reference in
# test_preference.py::test_other_methods_train_dpo[method1]; the prefixes' rollouts stay here.
@pytest.mark.parametrize("method", ["ptuning_v2", "prompt_tuning", pytest.param("ia3", marks=pytest.mark.slow)])
def test_other_methods_train_grpo(tmp_path, run, method):
    """Prefixes and soft prompts generate as they train (their keys and values in front of the cache)."""
    r = cli(tmp_path, *run, f"--config.method.name={method}", "--config.method.num_virtual_tokens=4",
            "--config.train.steps=2", "--config.export.enabled=False", "--config.data.eval_holdout=0")  # no eval
    assert r.returncode == 0, r.stderr[-3000:]
    row = [row for row in metrics(tmp_path) if "train/loss" in row][0]
    assert row["train/kl"] == 0 and np.isfinite(row["train/loss"])


def test_chinese_prompts_completions_and_rewards(tok_dir):
    """Chinese prompts round-trip through the tokenizer; completions decode whole characters, and the
    built-in lexicon reads them (好 counts; 不喜欢 is negative, not also a 喜欢)."""
    tok = Tokenizer(tok_dir)
    arrays, _, values = prompts.encode(records({"prompt": "我们今天看电影"}, {"text": "电影很好看"}), tok,
                                       sft.renderer(tok), 16, "text")
    assert tok.decode(arrays["input_ids"][0][arrays["attention_mask"][0] > 0]).strip() == "我们今天看电影"
    assert values == ["我们今天看电影", "电影很好看"]
    eos = tok.eos[0]
    new = np.array([tok.encode("很好看") + [eos, 5], tok.encode("不喜欢") + [eos, eos]])
    from jaxft import rewards

    total, _, mask, got_prompts, texts = grpo.score_completions(rewards.load("sentiment"), tok, new, np.array([eos]),
                                                                records({"prompt": "a"}, {"prompt": "b"}), [0, 1],
                                                                ["a", "b"])
    assert texts == ["很好看", "不喜欢"] and got_prompts == ["a", "b"]
    assert list(mask.sum(axis=1)) == [len(tok.encode("很好看")) + 1, len(tok.encode("不喜欢")) + 1]
    np.testing.assert_allclose(total, [1 / 2, -1 / 2])  # (1 - 0) / 2 and (0 - 1) / 2
    # A chat template's end of answer (here BOS standing in for <|im_end|>, `Data.stop`) ends a completion too.
    end = tok.bos_id
    new = np.array([tok.encode("很好看") + [end, 5, eos], tok.encode("不喜欢") + [eos, end, 5]])
    _, _, mask, _, texts = grpo.score_completions(rewards.load("sentiment"), tok, new, np.array([eos, end]),
                                                  records({"prompt": "a"}, {"prompt": "b"}), [0, 1], ["a", "b"])
    assert texts == ["很好看", "不喜欢"]
    assert list(mask.sum(axis=1)) == [len(tok.encode("很好看")) + 1, len(tok.encode("不喜欢")) + 1]


# ---------------------------------------------------------------------------------------------
# A reward model as a reward function (`model=PATH`)


def test_reward_model_scores_match_transformers(tmp_path, tok_dir):
    """A HF LlamaForSequenceClassification with one output: each prompt + completion rendered as
    data.task=reward trains on it (the user's turn, the assistant's answer, the chat template), and scored
    as transformers scores those ids; conversational prompts keep their turns."""
    import shutil

    from test_hf import build_hf

    from jaxft import rewards
    from jaxft.data import sft

    config = transformers.LlamaConfig(**{**BASE, "vocab_size": 300, "num_key_value_heads": 2, "num_labels": 1,
                                         "pad_token_id": 3})
    torch_model, d = build_hf(tmp_path, config, "LlamaForSequenceClassification")
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    [(name, fn, weight)] = rewards.load(f"model={d}")
    assert (name, weight) == ("reward_model", 1.0)
    tok = Tokenizer(d)
    turns = [{"role": "user", "content": "电影怎么样"}]
    prompts_, completions = ["the movie is", "the movie is", turns], ["good and funny", "bad", [{"role": "assistant",
                                                                                                "content": "很好看"}]]
    got = fn(prompts=prompts_, completions=completions)
    r = sft.renderer(tok)
    for prompt, completion, value in zip(prompts_, completions, got):
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + [
            {"role": "assistant", "content": rewards.text_of(completion)}]
        ids = sft.encode(r.segments(messages), tok)[0]
        assert ids == fn.ids(prompt, completion) and ids[-1] == tok.eos[0]
        with torch.no_grad():
            want = torch_model(torch.tensor([ids])).logits[0, 0].item()
        assert value == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == 3
    for bad, message in ((tmp_path / "none", "no such directory"),
                         (ROOT / "jaxft" / "assets" / "jaxft-tiny", "a causal_lm model with")):
        with pytest.raises(JaxftError, match=f"train.grpo_rewards: model={bad}: {message}"):
            rewards.load(f"model={bad}")


def test_cli_grpo_on_a_trained_reward_models_export(tmp_path):
    """The RLHF pipeline in jaxft: configs/reward_lora.py trains a reward model (a PEFT adapter on
    jaxft-tiny), and GRPO takes its export as the reward (`model=EXPORT`), the base named in the adapter.
    Both runs are also the tests that configs/reward_lora.py and configs/grpo_lora.py run and export (the
    latter's own reward, sentiment, one of the two here). PPO takes the same export as its separate critic
    (`train.ppo_critic`): the adapter folded into its base, whose score at a row's last token is the reward
    model's."""
    rm = tmp_path / "rm"
    r = cli(rm, "--config.train.steps=2", "--config.data.max_train_examples=24", "--config.data.eval_holdout=8",
            "--config.data.seq_len=32", "--config.eval.every_steps=0",
            "--config.optimizer.warmup_steps=0", config="configs/reward_lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: eval/loss=" in r.stdout and "done:" in r.stdout and "eval/reward_margin=" in r.stdout
    assert (rm / "export" / "adapter_model.safetensors").exists()
    policy = tmp_path / "policy"
    r = cli(policy, "--config.train.steps=2", "--config.data.max_train_examples=64", "--config.eval.every_steps=0",
            "--config.eval.generate_examples=8", "--config.train.grpo_max_new_tokens=8",
            "--config.eval.max_new_tokens=8",
            f"--config.train.grpo_rewards=model={rm / 'export'},sentiment", "--config.train.grpo_reward_weights=1,0.5",
            "--config.optimizer.warmup_steps=0", config="configs/grpo_lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: eval/reward=" in r.stdout and "train/reward=" in r.stdout
    assert (policy / "export" / "adapter_model.safetensors").exists()
    row = [row for row in metrics(policy) if "train/reward/reward_model" in row][-1]
    assert row["train/reward"] == pytest.approx(row["train/reward/reward_model"] + 0.5 * row["train/reward/sentiment"],
                                                abs=1e-5)
    assert row["train/reward/reward_model"] != 0 and row["train/reward_std"] > 0
    # the critic, as the run builds it, against the reward model with its adapter unmerged
    from jaxft import generate, ppo, sharding

    config = base_config()
    policy = generate.load("jaxft-tiny")[0]
    built = ppo.critic_model(str(rm / "export"), policy.cfg)
    critic, brings_head = built.model, built.brings_head
    params = ppo.critic_params(built)(policy, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    reward_model, reward_params, _ = generate.load("jaxft-tiny", str(rm / "export"))
    ids = np.random.default_rng(0).integers(3, policy.cfg.vocab_size, (3, 10)).astype(np.int32)
    mask = (np.arange(10) < np.array([[10], [7], [4]])).astype(np.int32)
    values = np.asarray(ppo.values(None, params, critic=critic, batch={"input_ids": ids, "attention_mask": mask}))
    scores = np.asarray(reward_model.apply({"params": reward_params}, ids, mask))[:, 0]
    assert brings_head and reward_model.hooks
    np.testing.assert_allclose(values[np.arange(3), mask.sum(1) - 1], scores, rtol=1e-4, atol=1e-5)
    r = cli(tmp_path / "ppo", "--config.train.steps=2", "--config.data.max_train_examples=64",
            "--config.eval.every_steps=0", "--config.eval.generate_examples=8", "--config.train.grpo_max_new_tokens=8",
            "--config.eval.max_new_tokens=8", f"--config.train.ppo_critic={rm / 'export'}",
            "--config.optimizer.warmup_steps=0", config="configs/ppo_lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "its score head gives the value at each token" in r.stdout and "train/value_loss=" in r.stdout


def test_cli_a_mixture_of_prompt_sources(tmp_path, run):
    """data.name='a+b' with data.weights: each source read with its own fields and held out on its own; reward
    functions see every record's fields, whichever source it came from."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"the movie {i}", "src": "a"}) + "\n" for i in range(40)))
    b.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"电影 {i}"}], "src": "b"}) + "\n"
                         for i in range(40)))
    (tmp_path / "r.py").write_text("def from_b(prompts, completions, src, **kw):\n"
                                   "    return [float(s == 'b') for s in src]\n")
    r = cli(tmp_path / "run", *run, f"--config.data.name={a}+{b}", "--config.data.weights=0.5,0.5",
            "--config.data.eval_holdout=4", f"--config.train.grpo_rewards={tmp_path / 'r.py'}:from_b",
            "--config.train.steps=4", "--config.export.enabled=False")
    assert r.returncode == 0, r.stderr[-3000:]
    rewards = [row["train/reward"] for row in metrics(tmp_path / "run") if "train/reward" in row]
    assert len(rewards) == 4 and 0 < np.mean(rewards) < 1  # both sources sampled
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_4.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and [s["reward"] for s in samples] == [0.0] * 4 + [1.0] * 4
    assert samples[0]["prompt"] == "the movie 36" and samples[4]["prompt"] == [{"role": "user", "content": "电影 36"}]
