"""GRPO and PPO on an encoder-decoder policy (T5): the prompt is the encoder's source, the decoder writes the
completion. Prompts as the seq2seq task reads sources; per-token log-probabilities of a tiny random T5 against
transformers' (with temperature); the GRPO loss and PPO's loss with a value head on the decoder's final states,
and every weight's gradient, against TRL's formulas in PyTorch autograd; the memory plan against XLA's; and the
CLI on the bundled jaxft-tiny-t5: the reward rises, resume is exact, 8 devices match one, jaxft.evaluate on
the checkpoint and the export gives training's eval, one-line errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_grpo import (assert_eight_devices_match_one, evaluated_reward, metrics, records,  # noqa: F401
                       trl_grpo_loss)
import test_preference
from test_train import cli, losses

from jaxft import grpo, hf, objectives, ppo
from jaxft.data import prompts, seq2seq, sft
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 99
# T5 v1.0's layout (ReLU, the LM head tied to the embedding, the decoder's states scaled by d_model**-0.5
# before it): the case where the states the head reads are not the decoder's final states.
TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    """A tiny T5 (the reference) and another (the policy), in both frameworks."""
    out = []
    for seed in (0, 5):
        torch.manual_seed(seed)
        m = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY)).eval()
        d = tmp_path_factory.mktemp(f"t5_{seed}")
        m.save_pretrained(d)
        out.append((m, *hf.load(str(d))))
    return out


def t5_rows(rows=6, prompt=7, new=6, seed=0):
    """Right-padded prompts and completions that end at an EOS (1) or run to the end, laid out as the
    rollout lays them out for an encoder-decoder (`grpo.policy_rows`)."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(2, prompt + 1, size=rows)
    p_mask = (np.arange(prompt) < p_len[:, None]).astype(np.int32)
    new_ids = rng.integers(2, V, size=(rows, new)).astype(np.int32)
    ends = rng.integers(0, new + 2, size=rows)  # where the EOS goes; >= new: none (a truncated completion)
    for r, e in enumerate(ends):
        if e < new:
            new_ids[r, e] = 1
            new_ids[r, e + 1:] = 0  # the pad generation writes after EOS
    mask = grpo.completion_mask(new_ids, np.array([1]))
    ids = rng.integers(2, V, size=(rows, prompt)).astype(np.int32) * p_mask
    batch = grpo.policy_rows({"input_ids": ids, "attention_mask": p_mask}, new_ids, mask, 0, decoder_start=0)
    return {**batch, "weight": np.ones((rows,), np.float32), "advantages": rng.normal(size=rows).astype(np.float32)}


def hf_token_log_probs(model, batch, temperature=1.0, hidden=False):
    """[rows, N] log p(completion token t) as transformers computes them from `labels` (it shifts them right
    behind the decoder start token itself); with `hidden`, also the decoder's final hidden states."""
    labels = torch.tensor(batch["labels"], dtype=torch.long)
    out = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long), labels=labels,
                output_hidden_states=hidden)
    logp = torch.log_softmax(out.logits.float() / temperature, -1)
    got = torch.gather(logp, 2, labels.clamp(min=0)[..., None])[..., 0]
    return (got, out.decoder_hidden_states[-1]) if hidden else got


# ---------------------------------------------------------------------------------------------
# Prompts: the encoder's sources


def test_prompts_are_the_sources_the_seq2seq_task_reads(tok_dir):
    tok = Tokenizer(tok_dir)
    r = sft.renderer(tok)
    fields = sft.Fields("mr", "ref")
    rows = [{"prompt": "the movie is"},
            {"instruction": "how was it?", "input": "the film"},  # Alpaca, no answer: its source
            {"mr": "name : x | area : y", "ref": "x is in y", "answer": "kept"},
            {"text": " ".join(["word"] * 40)}]  # a document: its start
    arrays, counts, values = prompts.encode(records(*rows), tok, r, 32, "text", fields, encoder_decoder=True)
    sources = ["the movie is", "how was it?\n\nthe film", "name : x | area : y", " ".join(["word"] * 40)]
    for i, text in enumerate(sources):
        want = seq2seq.encode_source(tok, text, 32)  # tokens + EOS, the start kept
        n = len(want)
        assert list(arrays["input_ids"][i, :n]) == want and arrays["attention_mask"][i].sum() == n  # right-padded
        assert not arrays["attention_mask"][i, n:].any() and (arrays["input_ids"][i, n:] == tok.pad_id).all()
    assert values[:3] == sources[:3] and values[3] == tok.decode(seq2seq.encode_source(tok, sources[3], 32)[:-1])
    assert counts.truncated == 1 and list(arrays["record"]) == [0, 1, 2, 3]
    # a conversation has no one source text: a bad record, skipped on request
    for row in ({"prompt": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user", "content": "hi"}]}):
        with pytest.raises(JaxftError, match="prompts.jsonl:1: .*an encoder-decoder reads one source text"):
            prompts.encode(records(row), tok, r, 12, "text", encoder_decoder=True)
    arrays, counts, _ = prompts.encode(records({"messages": []}, {"prompt": "ok"}), tok, r, 12, "text",
                                       skip_bad=True, encoder_decoder=True)
    assert counts.skipped == 1 and list(arrays["record"]) == [1]


# ---------------------------------------------------------------------------------------------
# Against transformers, TRL's formulas and PyTorch autograd


@pytest.mark.parametrize("fused, temperature", [(True, 1.0), (False, 1.0), (True, 0.7), (False, 0.7)])
def test_token_log_probs_match_transformers(t5_pair, fused, temperature):
    _, (pol_t, model, params) = t5_pair
    batch = t5_rows()
    assert batch["loss_mask"].sum(1).min() >= 1 and not batch["loss_mask"].all()  # some ended early, some did not
    outputs = model.apply({"params": params}, **grpo.policy_inputs(batch), return_hidden=fused)
    got = np.asarray(grpo.token_log_probs(outputs, batch, temperature))
    with torch.no_grad():
        want = hf_token_log_probs(pol_t, batch, temperature).numpy()
    keep = batch["loss_mask"] > 0
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grpo.completion_weights(batch)), keep)


@pytest.mark.parametrize("iterations, loss_type", [(1, "dapo"), (2, "grpo")])
def test_grpo_loss_and_gradients_match_pytorch(t5_pair, iterations, loss_type):
    """GRPO's loss, KL and clip ratio, and the gradient in every weight (full fine-tuning) of a T5 policy,
    against TRL's formulas on transformers' log-probabilities; with two iterations the sampler's are
    another policy's, so some ratios leave the clip range."""
    (ref_t, ref_model, ref_params), (pol_t, model, params) = t5_pair
    s = grpo.Settings(beta=0.3, epsilon=0.05, iterations=iterations, rewards="sentiment", loss_type=loss_type,
                      max_new_tokens=6)
    batch = t5_rows(8, 7, 6, seed=1)
    batch["weight"][-1] = 0.0  # an eval padding row counts nothing
    ref_logps = lambda p: grpo.token_log_probs(  # noqa: E731
        ref_model.apply({"params": p}, **grpo.policy_inputs(batch), return_hidden=True), batch)
    batch["ref_logps"] = ref_logps(ref_params)
    if iterations > 1:
        batch["old_logps"] = ref_logps(jax.tree_util.tree_map(lambda x: x * 1.02, ref_params))
    objective = grpo.objective(s)

    def mean_loss(p):
        sums = objective.loss(model.apply({"params": p}, **objective.inputs(batch), return_hidden=True), batch)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)

    w = torch.tensor(batch["loss_mask"] * batch["weight"][:, None], dtype=torch.float32)
    with torch.no_grad():
        ref = hf_token_log_probs(ref_t, batch)
    np.testing.assert_allclose(np.asarray(batch["ref_logps"])[w > 0], ref.numpy()[w > 0], rtol=1e-5, atol=1e-5)
    pol_t.zero_grad(set_to_none=True)
    logp = hf_token_log_probs(pol_t, batch)
    old = torch.tensor(np.asarray(batch["old_logps"])) if iterations > 1 else logp.detach()
    want, kl, clip = trl_grpo_loss(logp, old, ref, torch.tensor(batch["advantages"]), w, s.beta, s.epsilon, loss_type,
                                   s.max_new_tokens)
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert float(sums["kl"] / sums["count"]) == pytest.approx(kl.item(), rel=1e-5, abs=1e-7) and kl.item() > 0
    assert float(sums["clip_ratio"] / sums["count"]) == pytest.approx(clip.item(), abs=1e-6)
    assert (clip.item() > 0) == (iterations > 1)
    assert_gradients_match(model, grads, pol_t)


def assert_gradients_match(model, grads, torch_model):
    ours = family.of(model.cfg).params_to_hf(jax.device_get(grads), model.cfg)
    test_preference.assert_gradients_match(ours, torch_model, every=False)


def test_ppo_loss_and_value_head_match_pytorch(t5_pair):
    """PPO's clipped policy loss plus vf_coef times the clipped value loss, the value head on the decoder's
    final hidden states (transformers' `decoder_hidden_states[-1]`, as TRL's seq2seq value-head model reads
    them, not the states T5 v1.0 scales for its tied head): the loss and every gradient, the head's too."""
    _, (pol_t, model, params) = t5_pair
    s = ppo.Settings(epsilon=0.05, value_clip=0.05, value_coef=0.7, temperature=0.8)
    batch = t5_rows(8, 7, 6, seed=2)
    batch["weight"][-1] = 0.0
    rng = np.random.default_rng(3)
    shape = batch["labels"].shape
    with torch.no_grad():
        base = hf_token_log_probs(pol_t, batch, s.temperature).numpy()
    batch["old_logps"] = base + rng.normal(0, 0.1, shape).astype(np.float32)
    batch["old_values"], batch["returns"], batch["advantages"] = (rng.normal(size=shape).astype(np.float32)
                                                                  for _ in range(3))
    own = {"value_head": {"kernel": rng.normal(0, 0.3, model.cfg.hidden_size).astype(np.float32),
                          "bias": np.float32(0.2)}}
    objective = ppo.objective(s, family.of(model.cfg).head_scale(model.cfg))
    assert family.of(model.cfg).head_scale(model.cfg) == pytest.approx(32 ** -0.5)
    # the run's objective (and its rollout's old values) take the family's scale from the model's config
    assert objectives.for_task("ppo", None, model.cfg).rollout.args[1].keywords["head_scale"] == pytest.approx(32 ** -0.5)

    def mean_loss(p, own):
        outputs = model.apply({"params": p}, **objective.inputs(batch), return_hidden=True)
        sums = objective.loss(outputs, batch, own)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), (grads, own_grads) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(params, own)

    pol_t.zero_grad(set_to_none=True)
    w_head = torch.tensor(own["value_head"]["kernel"], requires_grad=True)
    b_head = torch.tensor(own["value_head"]["bias"], requires_grad=True)
    logp, states = hf_token_log_probs(pol_t, batch, s.temperature, hidden=True)
    v = states.float() @ w_head + b_head
    m = torch.tensor(batch["loss_mask"] * batch["weight"][:, None], dtype=torch.float32)
    a, ret, old_v = (torch.tensor(batch[k]) for k in ("advantages", "returns", "old_values"))
    ratio = torch.exp(logp - torch.tensor(batch["old_logps"]))
    pg = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - s.epsilon, 1 + s.epsilon))
    v_clip = old_v + torch.clamp(v - old_v, -s.value_clip, s.value_clip)
    vf = 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2)
    want = ((pg + s.value_coef * vf) * m).sum() / m.sum()
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert float(sums["value_loss"] / sums["count"]) == pytest.approx(((vf * m).sum() / m.sum()).item(), rel=1e-5)
    assert 0 < float(sums["clip_ratio"]) < float(sums["count"]) and 0 < float(sums["value_clip_ratio"])
    np.testing.assert_allclose(own_grads["value_head"]["kernel"], w_head.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert float(own_grads["value_head"]["bias"]) == pytest.approx(b_head.grad.item(), rel=1e-4)
    assert_gradients_match(model, grads, pol_t)


# ---------------------------------------------------------------------------------------------
# The command line, on the bundled jaxft-tiny-t5

REWARD = '''
def low_ids(prompts, completions, completion_ids, **columns):
    """The share of an 8-token budget spent on ids 3..999 (jaxft-tiny-t5 starts with sentinels, ids ~4000)."""
    assert len(columns["id"]) == len(prompts)
    return [sum(3 <= t < 1000 for t in ids) / 8 for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_t5")
    rng = np.random.default_rng(0)
    words = "the movie was good bad long short fun dull a an it is".split()
    (d / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(rng.choice(words, rng.integers(2, 7))), "id": i}) + "\n" for i in range(200)))
    (d / "reward.py").write_text(REWARD)
    return ("--config.model.path=jaxft-tiny-t5", f"--config.data.name={d / 'prompts.jsonl'}", "--config.data.task=grpo",
            "--config.data.eval_holdout=16", "--config.data.seq_len=16",
            f"--config.train.grpo_rewards={d / 'reward.py'}:low_ids", "--config.train.grpo_max_new_tokens=8",
            "--config.eval.max_new_tokens=8", "--config.method.name=full", "--config.optimizer.learning_rate=3e-3",
            "--config.optimizer.schedule=constant", "--config.train.log_every_steps=1",
            "--config.checkpoint.every_steps=10")


def test_cli_reward_rises_resumes_exactly_and_evaluates(tmp_path, t5_run):
    """8 steps: eval/reward 0.19 at the start, 0.87 at step 4, 1.0 from step 6 (measured with eval every 2 steps)."""
    run = tmp_path / "run"
    go = (*t5_run, "--config.train.steps=8", "--config.checkpoint.every_steps=6")  # checkpoints at 6 and 8
    r = cli(run, *go, "--config.eval.at_start=True")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled the train step for batch 8 x 16 -> 8 target tokens" in r.stdout  # encoder 16, decoder 8
    rows = metrics(run)
    evals = [row for row in rows if "eval/reward" in row]
    assert evals[0]["step"] == 0 and evals[0]["eval/reward"] < 0.5 and evals[-1]["eval/reward"] >= 0.9, evals
    first = next(row for row in rows if "train/loss" in row)
    assert first["step"] == 1 and first["train/kl"] == 0 and 0 <= first["train/reward"] <= 1
    samples = [json.loads(line) for line in (run / "samples" / "step_8.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in open(t5_run[1].split("=", 1)[1]).readlines()[-16:]]
    assert [s["prompt"] for s in samples] == [h["prompt"] for h in held_out]  # the encoder's sources, as given
    assert (run / "export" / "model.safetensors").exists()
    # jaxft.evaluate scores the export as training's eval did (a checkpoint goes the path test_grpo.py tests)
    assert evaluated_reward(tmp_path, t5_run, run / "export") == pytest.approx(evals[-1]["eval/reward"], abs=1e-6)
    # killed after the checkpoint of step 6 (the last one removed) and run again: the same completions are
    # drawn, so the same steps follow
    straight = losses(run)
    shutil.rmtree(run / "checkpoints" / "8")
    r = cli(run, *go)
    assert r.returncode == 0 and "resuming from step 6" in r.stdout, r.stderr[-3000:]
    assert losses(run) == straight


def test_ppo_eight_devices_and_micro_batches_match_one_device(tmp_path, t5_run):
    """PPO's value head on T5's decoder states (encoder and decoder rows of other lengths), prompts, their
    groups and the whitening over the devices and micro-batches. Within 1e-4 (or 1e-5 of a figure near 0),
    not the decoders' 2e-5 (or 1e-6), and not for T5's ops. Measured with jaxlib 0.10.2 on 2 AMD cores:
    - XLA:CPU runs f32 dots and reductions as YNNPACK fusions whose summation order depends on the number
      of rows (a [M, 256] x [256, 256] matmul adds one way for M = 2..48, another for M = 1 or >= 56):
      jaxft-tiny-t5's logits part by 1e-5 between 4 rows and the same rows among 8, first in the decoder's
      q projection of bit-identical inputs; with the fusions off (--xla_cpu_experimental_ynn_fusion_type=)
      they are equal bit for bit, and the 256-wide jaxft-tiny (Llama) parts as much. The decoders' tests
      run tiny_test's 32-wide Llama, whose short sums part by 1e-8.
    - What needs the wider abs is train/loss at steps 1 and 2 (1e-6 apart): its policy term, the mean of
      -advantage * ratio over whitened advantages, is 0 but for the ratio's rounding (old log-probs from
      the rollout's forward over the whole batch, new ones from the train step's micro-batch): -7e-7 on
      one device, +3e-7 on eight; as far apart with the YNNPACK fusions off and with no tensor
      parallelism (the decoders': 2e-8). The other figures are within 7e-5 relative (KL; Adam's steps
      amplify the rest). Every figure here stays within 0.11 of this tolerance.
    A row or group in the wrong place parts by far more at step 1."""
    assert_eight_devices_match_one(tmp_path, (*t5_run, "--config.data.task=ppo", "--config.method.name=lora",
                                              "--config.train.grpo_generations=2",
                                              "--config.train.grpo_iterations=2", "--config.train.steps=4",
                                              "--config.export.enabled=False", "--config.eval.batch_size=16",
                                              "--config.checkpoint.every_steps=4"), rel=1e-4, abs=1e-5)
    first = next(row for row in metrics(tmp_path / "one") if "train/loss" in row)
    assert first["train/value_loss"] > 0 and first["train/kl"] == 0


def test_cli_what_an_encoder_decoder_cannot_do_is_one_line(tmp_path, t5_run):
    p = tmp_path / "chat.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for bad, message in (((f"--config.data.name={p}", "--config.data.eval_holdout=0"),
                          f"{p}:1: a conversation (a list of turns); an encoder-decoder reads one source text"),
                         (("--config.model.head=causal_lm",), "model.head='causal_lm' does not fit data.task='grpo'")):
        r = cli(tmp_path / "run", *t5_run, *bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + message), r.stderr
        assert not (tmp_path / "run").exists()


def test_grpo_t5_config_runs_and_exports(tmp_path):
    """configs/grpo_t5.py: E2E meaning representations as the encoder's sources, the rouge reward reading
    each record's reference."""
    r = cli(tmp_path, "--config.train.steps=2", "--config.data.max_train_examples=64", "--config.eval.every_steps=0",
            "--config.eval.generate_examples=8", "--config.train.grpo_max_new_tokens=8", "--config.eval.max_new_tokens=8",
            "--config.optimizer.warmup_steps=0", config="configs/grpo_t5.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: eval/reward=" in r.stdout and "train/reward=" in r.stdout
    samples = [json.loads(line) for line in (tmp_path / "samples" / "step_2.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and samples[0]["prompt"].startswith("name : ")
    assert (tmp_path / "export" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# The memory plan


def test_plan_counts_encoder_and_decoder_rows_within_15_percent_of_xla():
    """batch_size prompts plan as batch_size x G rows: the encoder's of seq_len prompt tokens, the decoder's
    of max_new_tokens completion tokens; against XLA's figure for the train step on such rows."""
    from test_plan import compiled_bytes, family_config

    from jaxft import plan, sharding

    def t5_config(**kw):
        c = family_config("t5", "lora")
        c.data.task, c.train.grpo_rewards = "grpo", "sentiment"
        for k, v in kw.items():
            section, name = k.split("__")
            c[section][name] = v
        return c

    c = t5_config(data__seq_len=128, train__batch_size=4, train__grpo_max_new_tokens=32)
    s = plan.setup(c, 1)
    assert s.cfg.head == "seq2seq_lm" and s.sequences == 4 and (s.length, s.target_length) == (128, 32)
    rows = t5_config(data__seq_len=128, train__batch_size=16, train__grpo_max_new_tokens=32)  # what the step sees

    def made(s, ids):
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
        at = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        dec = at((16, 32), jnp.int32)
        return {"decoder_input_ids": dec, "labels": dec, "loss_mask": dec, "advantages": at((16,), jnp.float32),
                "ref_logps": at((16, 32), jnp.float32)}

    reference = sum(np.prod(x.shape) * x.dtype.itemsize for p, x in s.abstract.items() if s.trainable[p])
    want = compiled_bytes(rows, 1, extra=made, objective=grpo.objective(grpo.settings(c.train))) + reference
    got = plan.estimate(s)
    assert got["total"] == pytest.approx(want, rel=0.15), (got, want)
    # the decoder's rows are the completions': 4x more of them cost more than 4x more prompt tokens would
    longer = t5_config(data__seq_len=128, train__batch_size=4, train__grpo_max_new_tokens=128)
    longer = plan.estimate(plan.setup(longer, 1))
    assert longer["activations"] > got["activations"]
