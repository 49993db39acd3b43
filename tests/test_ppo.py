"""PPO with a value head (`jaxft.ppo`): GAE and whitening against TRL's PPOTrainer loops, the loss and
every weight's gradient (the value head's too) against TRL's formulas in PyTorch autograd on
transformers' hidden states, and the CLI: the reward rises, resume is exact, 8 devices with
micro-batches match one, the value head is checkpointed but never exported, jaxft.evaluate restores it."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_grpo import (assert_eight_devices_match_one, evaluated_reward, experience, metrics, run,  # noqa: F401
                       torch_token_log_probs)  # (run: a fixture)
from test_hf import BASE, build_hf
from test_preference import assert_gradients_match, hf_pair  # noqa: F401  (hf_pair: a fixture)
from test_train import assert_resumes_exactly, cli

from jaxft import generate, hf, objectives, ppo
from jaxft.config import base_config, validate
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.partition import flat, merge

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def trl_gae(rewards, values, mask, gamma, lam):
    """TRL's PPOTrainer loop over the completion positions of each row (here: `mask`), with the value
    after the last token 0."""
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = np.flatnonzero(mask[b])
        last = 0.0
        for i in reversed(range(len(pos))):
            t = pos[i]
            next_value = values[b, pos[i + 1]] if i + 1 < len(pos) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            out[b, t] = last
    return out


def trl_whiten(x, mask):
    """TRL's masked_whiten: masked mean, masked variance with Bessel's correction."""
    x, m = torch.tensor(x), torch.tensor(mask)
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    return ((x - mean) * torch.rsqrt(var + 1e-8) * m).numpy()


def test_gae_and_whitening_match_trl():
    rng = np.random.default_rng(0)
    mask = np.zeros((4, 9), np.float32)
    for b, (start, stop) in enumerate([(2, 9), (3, 5), (0, 1), (4, 8)]):
        mask[b, start:stop] = 1
    rewards, values = rng.normal(size=(2, 4, 9)).astype(np.float32) * mask
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        got = np.asarray(ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam))
        np.testing.assert_allclose(got, trl_gae(rewards, values, mask, gamma, lam), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ppo.whiten(jnp.asarray(rewards), jnp.asarray(mask))), trl_whiten(rewards, mask),
                               rtol=1e-5, atol=1e-6)


def test_rewards_advantages_and_value_targets_match_trl():
    """TRL's PPOTrainer: per-token rewards -beta (log pi_old - log ref), the score added at the last
    completion token; GAE against the old values; returns = advantages + values; advantages whitened."""
    s = ppo.Settings(beta=0.3, gamma=0.9, lam=0.8)
    batch = experience(5, 4, 6, seed=4)
    rng = np.random.default_rng(5)
    old, ref, v = (rng.normal(size=batch["input_ids"].shape).astype(np.float32) for _ in range(3))
    batch["scores"] = rng.normal(size=5).astype(np.float32)
    a, ret, kl = ppo.targets(s, batch, old, v, ref)  # old log-probs, old values, the reference's
    m = np.asarray(objectives.next_token(batch["attention_mask"] * batch["loss_mask"]), np.float32)
    r = -s.beta * (old - ref) * m
    for b in range(5):
        r[b, np.flatnonzero(m[b])[-1]] += batch["scores"][b]
    want = trl_gae(r, v * m, m, s.gamma, s.lam)
    np.testing.assert_allclose(np.asarray(ret), want + v * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a), trl_whiten(want, m), rtol=1e-4, atol=1e-5)
    assert float(kl) == pytest.approx(((old - ref) * m).sum() / m.sum(), rel=1e-5)


def test_loss_and_gradients_match_pytorch(hf_pair):  # noqa: F811
    """PPO's clipped policy loss plus vf_coef times the clipped value loss, the value head on the final
    hidden states: against TRL's formulas on transformers' last hidden states, in every weight and in the
    value head (full fine-tuning)."""
    (_, _, _), (pol_t, model, params) = hf_pair
    s = ppo.Settings(epsilon=0.05, value_clip=0.05, value_coef=0.7)
    batch = experience(8, 6, 8, seed=2)
    batch["weight"][-1] = 0.0
    rng = np.random.default_rng(3)
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        base = torch_token_log_probs(pol_t, batch).numpy()
    batch["old_logps"] = np.pad(base, ((0, 0), (0, 1))) + rng.normal(0, 0.1, (8, t)).astype(np.float32)
    batch["old_values"] = rng.normal(size=(8, t)).astype(np.float32)
    batch["returns"] = rng.normal(size=(8, t)).astype(np.float32)
    batch["advantages"] = rng.normal(size=(8, t)).astype(np.float32)
    own = {"value_head": {"kernel": rng.normal(0, 0.3, model.cfg.hidden_size).astype(np.float32),
                          "bias": np.float32(0.2)}}
    objective = ppo.objective(s)

    def mean_loss(p, own):
        outputs = model.apply({"params": p}, **objective.inputs(batch), return_hidden=True)
        sums = objective.loss(outputs, batch, own)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), (grads, own_grads) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(params, own)

    pol_t.zero_grad(set_to_none=True)
    w_head = torch.tensor(own["value_head"]["kernel"], requires_grad=True)
    b_head = torch.tensor(own["value_head"]["bias"], requires_grad=True)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = pol_t(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    logp = torch.gather(torch.log_softmax(out.logits.float()[:, :-1], -1), 2, ids[:, 1:, None])[..., 0]
    v = (out.hidden_states[-1].float() @ w_head + b_head)[:, :-1]
    cut = lambda k: torch.tensor(batch[k][:, :-1])  # noqa: E731
    m = torch.tensor(objectives.next_token(batch["attention_mask"] * batch["loss_mask"])[:, :-1] *
                     batch["weight"][:, None], dtype=torch.float32)
    a, ret, old_v = cut("advantages"), cut("returns"), cut("old_values")
    ratio = torch.exp(logp - cut("old_logps"))
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
    ours = family.of(model.cfg).params_to_hf(jax.device_get(grads), model.cfg)
    assert_gradients_match(ours, pol_t)


def critic_batch(seed=2):
    """A batch of completions with the rollout's figures, for the loss with a separate critic."""
    batch = experience(8, 6, 8, seed=seed)
    batch["weight"][-1] = 0.0
    rng = np.random.default_rng(seed + 1)
    for k in ("old_values", "returns", "advantages"):
        batch[k] = rng.normal(size=batch["input_ids"].shape).astype(np.float32)
    return batch


def critic_setup(hf_pair, tmp_path, method="full", method_config=None):  # noqa: F811
    """A reward model (LlamaForSequenceClassification, one output) as the critic, with `method`: -> (its
    torch model, its directory, the settings, the batch, the objective, own parameters -> `our_loss`)."""
    (_, _, _), (pol_t, model, params) = hf_pair
    config = transformers.LlamaConfig(**{**BASE, "num_hidden_layers": 3, "num_labels": 1, "pad_token_id": 0})
    critic_t, critic_dir = build_hf(tmp_path, config, "LlamaForSequenceClassification", seed=9, sub="critic")
    s = ppo.Settings(epsilon=0.05, value_clip=0.05, value_coef=0.7, critic=str(critic_dir), critic_method=method)
    batch = critic_batch()
    with torch.no_grad():
        base = torch_token_log_probs(pol_t, batch).numpy()
    batch["old_logps"] = np.pad(base, ((0, 0), (0, 1)))
    objective = ppo.objective(s, 1.0, model.cfg, method_config)
    return critic_t, critic_dir, s, batch, objective, functools.partial(our_loss, objective, batch, model, params)


def our_loss(objective, batch, model, params, own):
    """-> (the mean loss, its sums, (the policy's gradients, those of the critic's trainable leaves))."""
    own, own_frozen = objectives.split_own(objective, own)

    def mean_loss(p, own):
        outputs = model.apply({"params": p}, **objective.inputs(batch), return_hidden=True)
        sums = objective.loss(outputs, batch, merge(own, own_frozen))
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(params, own)
    return loss, sums, grads


def torch_value_loss(critic_t, batch, s):
    """TRL's losses with the critic read at every position (`score(model(...).last_hidden_state)`), the
    value loss's backward run: -> (the values at every position, the mean value loss, the mean loss
    (the policy's at ratio 1, old = new, plus the weighted value loss))."""
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    critic_t.zero_grad(set_to_none=True)
    states = critic_t.model(ids, attention_mask=mask, position_ids=positions).last_hidden_state
    v_full = critic_t.score(states).float()[..., 0]
    v = v_full[:, :-1]
    cut = lambda k: torch.tensor(batch[k][:, :-1])  # noqa: E731
    m = torch.tensor(objectives.next_token(batch["attention_mask"] * batch["loss_mask"])[:, :-1] *
                     batch["weight"][:, None], dtype=torch.float32)
    ret, old_v, a = cut("returns"), cut("old_values"), cut("advantages")
    v_clip = old_v + torch.clamp(v - old_v, -s.value_clip, s.value_clip)
    vf = 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2)
    ((s.value_coef * vf * m).sum() / m.sum()).backward()
    pg = torch.max(-a, -a * torch.clamp(torch.ones_like(a), 1 - s.epsilon, 1 + s.epsilon))  # ratio 1: old = new
    mean = lambda x: ((x * m).sum() / m.sum()).item()  # noqa: E731
    return v_full.detach().numpy(), mean(vf), mean(pg + s.value_coef * vf)


def assert_losses_match(ours, theirs):
    (loss, sums, _), (_, value_loss, want) = ours, theirs
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(sums["value_loss"] / sums["count"]) == pytest.approx(value_loss, rel=1e-5)
    assert 0 < float(sums["value_clip_ratio"]) < float(sums["count"])


def test_separate_critic_values_loss_and_gradients_match_pytorch(hf_pair, tmp_path):  # noqa: F811
    """train.ppo_critic: a reward model (LlamaForSequenceClassification, one output) as the critic, its score
    head read at every position as TRL's value model is (`score(model(...).last_hidden_state)`): the values,
    the value loss and every critic weight's gradient against PyTorch autograd; the policy's gradients
    are the value head's run's (the value loss reaches the critic alone)."""
    (_, _, _), (_, model, params) = hf_pair
    critic_t, critic_dir, s, batch, objective, loss_of = critic_setup(hf_pair, tmp_path)
    critic, root, base, brings_head, method = ppo.critic_model(s.critic, model.cfg)
    assert brings_head and root == base == critic_dir and critic.cfg.pooling == "every" and method.name == "full"
    own = {"critic": hf.load(str(critic_dir))[1]}
    assert not objectives.split_own(objective, own)[1]  # every weight trains
    ours = loss_of(own)
    grads, own_grads = ours[2]
    theirs = torch_value_loss(critic_t, batch, s)
    np.testing.assert_allclose(np.asarray(ppo.values(None, own, critic=critic, batch=batch)), theirs[0],
                               rtol=1e-4, atol=1e-5)
    assert_losses_match(ours, theirs)
    ours = family.of(critic.cfg).params_to_hf(jax.device_get(own_grads["critic"]), hf.load(str(critic_dir))[0].cfg)
    assert_gradients_match(ours, critic_t)
    # The policy's gradient is the policy loss's alone, as with the value head (whose value loss does not reach it).
    head_own = {"value_head": {"kernel": np.zeros(model.cfg.hidden_size, np.float32), "bias": np.float32(0)}}
    plain = ppo.objective(dataclasses.replace(s, critic=""))
    policy_only = jax.grad(lambda p: (lambda o: o["loss_sum"] / o["count"])(plain.loss(
        model.apply({"params": p}, **plain.inputs(batch), return_hidden=True), batch, head_own)))(params)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), grads, policy_only)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_critic_values_loss_and_gradients_match_peft(hf_pair, tmp_path, dora):  # noqa: F811
    """train.ppo_critic_method=lora: the critic is PEFT's SEQ_CLS LoRA model of the reward model (the run's
    method.rank, alpha, targets and dora), its score head trained beside the factors: the values, the
    losses and the gradient of every trained weight (LoRA's A and B, DoRA's magnitudes, the score head)
    against PyTorch autograd through PEFT; its frozen weights sit apart from the trained ones."""
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file

    from jaxft.peft import hf_peft

    method = base_config().method
    method.rank, method.alpha, method.targets, method.dora = 4, 8.0, "q_proj,v_proj,down_proj", dora
    method.trainable_pattern = "embed_tokens"  # the policy's: never the critic's
    critic_t, critic_dir, s, batch, objective, loss_of = critic_setup(hf_pair, tmp_path, "lora", method)
    peft_t = get_peft_model(critic_t, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora))
    peft_t.save_pretrained(tmp_path / "adapter")
    critic, model_method = objective.own_model.model, objective.own_model.method
    assert model_method.name == "lora" and len(critic.hooks) == 1 and critic.hooks[0].dora == dora
    _, own, _ = generate.load(str(critic_dir), str(tmp_path / "adapter"))
    own = {"critic": own}
    trains, frozen = objectives.split_own(objective, own)
    names = set(flat(trains["critic"]))
    assert names and all(re.search(r"lora_(a|b|magnitude)$|^score/", p) for p in names), names
    assert not set(flat(frozen["critic"])) & names and "embed_tokens" in flat(frozen["critic"])
    ours = loss_of(own)
    theirs = torch_value_loss(critic_t, batch, s)
    np.testing.assert_allclose(np.asarray(ppo.values(None, own, critic=critic, batch=batch)), theirs[0],
                               rtol=1e-4, atol=1e-5)
    assert_losses_match(ours, theirs)
    # our gradients through the adapter export (linear in its tensors), named as PEFT saves them
    hf_peft.save_adapter(critic, model_method, jax.device_get(ours[2][1]["critic"]), tmp_path / "grads")
    grads = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))
    want = {re.sub(r"\.(modules_to_save\.)?default\b", "", n).replace("magnitude_vector.weight", "magnitude_vector"):
            p.grad.numpy() for n, p in peft_t.named_parameters() if p.requires_grad}
    assert grads.keys() == want.keys() and any("lora_B" in n for n in want), set(grads) ^ set(want)
    for name, g in want.items():
        assert np.abs(g).max() > 0, name
        np.testing.assert_allclose(grads[name], g, atol=3e-5 * np.abs(g).max(), err_msg=name)


def test_separate_critic_is_checked(hf_pair, tmp_path):  # noqa: F811
    """A critic that cannot read the policy's rows is one line naming train.ppo_critic, before anything runs."""
    (_, _, _), (_, model, _) = hf_pair
    cases = {
        "nowhere": (str(tmp_path / "nowhere"), "no such directory"),
        "labels": (transformers.LlamaConfig(**{**BASE, "num_labels": 3}), "a classifier with 3 outputs"),
        "vocab": (transformers.LlamaConfig(**{**BASE, "vocab_size": BASE["vocab_size"] + 8, "num_labels": 1}),
                  "must share its tokenizer"),
        "bert": (transformers.BertConfig(vocab_size=BASE["vocab_size"], hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64), "expected a decoder-only model"),
    }
    adapters = (("causal_adapter", {"task_type": "CAUSAL_LM", "base_model_name_or_path": "jaxft-tiny"},
                 "an adapter with task_type='CAUSAL_LM'; expected a reward model's"),
                ("baseless_adapter", {"task_type": "SEQ_CLS"}, "names no base model"))
    for name, adapter, message in adapters:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(adapter))
        cases[name] = (str(tmp_path / name), message)
    for name, (config, message) in cases.items():
        path = config
        if not isinstance(config, str):
            cls = {"bert": "BertForSequenceClassification"}.get(name, "LlamaForSequenceClassification")
            path = str(build_hf(tmp_path, config, cls, sub=name)[1])
        with pytest.raises(JaxftError, match=f"^train.ppo_critic='{path}': .*{message}"):
            ppo.critic_model(path, model.cfg)
    config = base_config()
    config.data.task, config.train.ppo_critic = "grpo", str(tmp_path / "labels")
    with pytest.raises(JaxftError, match=r"^train.ppo_critic='.*': PPO's separate critic: expected data.task='ppo'"):
        validate(config)
    t5 = transformers.T5Config(vocab_size=BASE["vocab_size"], d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    t5_cfg = hf.read_config(build_hf(tmp_path, t5, "T5ForConditionalGeneration", sub="t5")[1])
    with pytest.raises(JaxftError, match="an encoder-decoder: expected a decoder-only policy"):
        ppo.critic_model("jaxft-tiny", t5_cfg)
    # train.ppo_critic_method: a method of the critic's own, with the run's settings of it
    reward_model = str(tmp_path / "reward")
    build_hf(tmp_path, transformers.LlamaConfig(**{**BASE, "num_labels": 1}), "LlamaForSequenceClassification",
             sub="reward")
    method = base_config().method
    method.targets = "lm_head"
    for name, method_config, message in (
            ("adalora", None, "expected one of full, head, bitfit, lora, ia3, adapter, or several joined by '\\+'"),
            ("lora+prompt_tuning", None, "expected one of"),
            ("lora", method, "method.targets='lm_head'")):
        with pytest.raises(JaxftError, match=f"^train.ppo_critic_method='{re.escape(name)}': {message}"):
            ppo.critic_model(reward_model, model.cfg, name, method_config)
    config = base_config()
    config.data.task, config.train.ppo_critic_method = "ppo", "lora"
    with pytest.raises(JaxftError, match=r"^train.ppo_critic_method='lora': .* expected train.ppo_critic=PATH"):
        validate(config)


@pytest.mark.parametrize("critic_method", ["full", "lora"])
def test_plan_counts_the_critic_within_15_percent_of_xla(tmp_path, critic_method):
    """jaxft.plan with train.ppo_critic: the critic's weights, its trainable ones' gradients and moments, and
    its activations on the policy's rows (prompt + completion tokens) beside a LoRA policy's, against XLA's
    figure for the train step; every critic weight trains, or its LoRA factors and score head."""
    from test_plan import compiled_bytes
    from test_plan import config as plan_config

    from jaxft import plan
    from jaxft.peft.partition import unflat

    critic = transformers.LlamaConfig(**{**BASE, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 352,
                                         "num_attention_heads": 4, "num_hidden_layers": 3, "num_labels": 1})
    critic_dir = build_hf(tmp_path, critic, "LlamaForSequenceClassification", sub="critic")[1]

    def ppo_config(seq_len):
        c = plan_config("lora", "none", 1, data__task="ppo", data__seq_len=seq_len, train__grpo_rewards="sentiment",
                        train__grpo_max_new_tokens=32, train__ppo_critic=str(critic_dir),
                        train__ppo_critic_method=critic_method)
        c.train.grpo_generations = 1
        return c

    c = ppo_config(96)
    s = plan.setup(c, 1)
    assert s.own is not None and s.own.length == s.length == 128
    assert all(s.own.trainable.values()) == (critic_method == "full") and s.own.method.name == critic_method
    alone = plan.setup(ppo_config(96), 1)
    alone.own = None
    got, without = plan.estimate(s), plan.estimate(alone)
    critic_bytes = sum(4 * int(np.prod(x.shape)) for x in s.own.abstract.values())
    trained = sum(4 * int(np.prod(x.shape)) for p, x in s.own.abstract.items() if s.own.trainable[p])
    assert got["weights"] - without["weights"] == critic_bytes  # fp32, on one device
    assert got["optimizer"] - without["optimizer"] == 2 * trained and got["gradients"] - without["gradients"] == trained

    def made(s, ids):
        f32 = jax.ShapeDtypeStruct(ids.shape, jnp.float32, sharding=ids.sharding)
        return {"loss_mask": ids, **{k: f32 for k in ("old_logps", "old_values", "returns", "advantages")}}

    def own(s, mesh, leaf):
        from jax.sharding import NamedSharding

        return {"critic": unflat({p: leaf(x, NamedSharding(mesh, s.own.shardings[p].spec))
                                  for p, x in s.own.abstract.items()})}

    rows = ppo_config(128)  # what the step sees: prompt + completion tokens
    reference = sum(np.prod(x.shape) * x.dtype.itemsize for p, x in s.abstract.items() if s.trainable[p])
    want = compiled_bytes(rows, 1, extra=made, objective=objectives.for_task("ppo", rows.train, s.cfg), own=own)
    assert got["total"] == pytest.approx(want + reference, rel=0.15), (got, want + reference)


# ---------------------------------------------------------------------------------------------
# The command line


def ppo_run(run):  # noqa: F811
    return (*run, "--config.data.task=ppo", "--config.train.grpo_generations=1", "--config.train.batch_size=16",
            "--config.train.grpo_iterations=2")


def test_cli_reward_rises_resumes_exactly_and_exports_the_policy_alone(tmp_path, run):  # noqa: F811
    go = ppo_run(run)
    straight = tmp_path / "straight"
    ckpt = "--config.checkpoint.every_steps=14"  # checkpoints at 14, 28 and the last step, 30 (2 kept)
    r = cli(straight, *go, "--config.train.steps=30", "--config.eval.at_start=True", ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(straight)
    evals = [row for row in rows if "eval/reward" in row]
    assert evals[0]["step"] == 0 and evals[-1]["eval/reward"] > evals[0]["eval/reward"] + 0.2, evals
    first = next(row for row in rows if "train/loss" in row)
    assert first["step"] == 1 and first["train/kl"] == 0 and first["train/clip_ratio"] == 0  # the start, its reference
    assert first["train/value_loss"] > 0 and "train/value_clip_ratio" in first
    # The value head trains and is checkpointed, but the export is the policy alone: a HF model.
    from safetensors.numpy import load_file

    exported = load_file(str(straight / "export" / "model.safetensors"))
    assert not any("value" in k for k in exported)
    # killed after the checkpoint of step 28 (a copy of the run, the last checkpoint removed) and run again
    assert_resumes_exactly(straight, tmp_path / "split", (*go, "--config.train.steps=30", ckpt), 28, 30)
    # jaxft.evaluate rebuilds the run (value head included) from the checkpoint and scores its completions
    assert evaluated_reward(tmp_path, go, straight) == pytest.approx(evals[-1]["eval/reward"], abs=1e-6)


def test_cli_separate_critic_trains_resumes_exactly_and_is_never_exported(tmp_path, run, monkeypatch):  # noqa: F811
    """train.ppo_critic: a reward model of its own as the critic, every weight trained beside the policy's:
    its value loss falls, resume is exact (the critic is checkpointed), the export is the policy alone,
    jaxft.evaluate rebuilds the run, and a 2 x 2 x 2 mesh with micro-batches (the critic's weights split
    over FSDP and tensor shards as the policy's) gives the same figures."""
    config = transformers.LlamaConfig(**{**BASE, "vocab_size": 300, "num_labels": 1, "pad_token_id": 0})
    critic_dir = build_hf(tmp_path, config, "LlamaForSequenceClassification", sub="critic")[1]
    go = (*ppo_run(run), f"--config.train.ppo_critic={critic_dir}", "--config.train.steps=12",
          "--config.checkpoint.every_steps=6", "--config.eval.every_steps=12", "--config.eval.batch_size=16")
    straight = tmp_path / "straight"
    r = cli(straight, *go)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"critic: {critic_dir} (" in r.stdout and "its score head gives the value" in r.stdout, r.stdout
    rows = [row for row in metrics(straight) if "train/value_loss" in row]
    assert rows[-1]["train/value_loss"] < rows[0]["train/value_loss"] / 2, rows
    from safetensors.numpy import load_file

    exported = load_file(str(straight / "export" / "model.safetensors"))
    assert not any(k.startswith("score") or "critic" in k for k in exported)
    with monkeypatch.context() as m:  # a new interpreter, jaxft.train its __main__ (the critic imports it)
        m.setenv("JAXFT_TEST_FORK", "0")
        assert_resumes_exactly(straight, tmp_path / "split", go, 6, 12)
    final = [row for row in metrics(straight) if "eval/reward" in row][-1]
    assert evaluated_reward(tmp_path, go, straight) == pytest.approx(final["eval/reward"], abs=1e-6)
    assert_eight_devices_match_one(tmp_path, go, one=straight)


def lora_critic_beside_qlora(tmp_path, run):
    """(the critic's HF config, its directory, the CLI arguments): train.ppo_critic_method=lora beside a
    QLoRA policy."""
    config = transformers.LlamaConfig(**{**BASE, "vocab_size": 300, "num_labels": 1, "pad_token_id": 0})
    critic_dir = build_hf(tmp_path, config, "LlamaForSequenceClassification", sub="critic")[1]
    go = (*ppo_run(run), "--config.method.name=lora", "--config.method.rank=4", "--config.model.quantization=nf4",
          f"--config.train.ppo_critic={critic_dir}", "--config.train.ppo_critic_method=lora",
          "--config.optimizer.learning_rate=1e-2", "--config.train.steps=12", "--config.checkpoint.every_steps=6",
          "--config.eval.every_steps=12", "--config.eval.batch_size=16", "--config.export.enabled=False")
    return config, critic_dir, go


def test_cli_lora_critic_beside_a_qlora_policy_trains_and_resumes_exactly(tmp_path, run):  # noqa: F811
    """train.ppo_critic_method=lora beside a QLoRA policy: only the critic's LoRA factors and score head
    train (the model line counts them as the objective's), its value loss falls, resume is exact with its
    frozen weights read again (and quantized as the policy's base), and jaxft.evaluate rebuilds the run."""
    config, critic_dir, go = lora_critic_beside_qlora(tmp_path, run)
    straight = tmp_path / "straight"
    r = cli(straight, *go)
    assert r.returncode == 0, r.stderr[-3000:]
    total, trains = map(lambda n: int(n.replace(",", "")), re.search(
        rf"critic: {re.escape(str(critic_dir))} \(([\d,]+) parameters, ([\d,]+) train \(lora\)", r.stdout).groups())
    lora = 2 * 4 * 2 * (config.hidden_size + config.num_key_value_heads * config.hidden_size // 4)  # q and v, 2 layers
    assert trains == lora + config.hidden_size and total > 10 * trains, (total, trains)  # + the score head
    assert f"+ {trains:,} of the ppo objective" in r.stdout, r.stdout
    rows = [row for row in metrics(straight) if "train/value_loss" in row]
    assert rows[-1]["train/value_loss"] < rows[0]["train/value_loss"] / 2, rows
    assert_resumes_exactly(straight, tmp_path / "split", go, 6, 12)
    final = [row for row in metrics(straight) if "eval/reward" in row][-1]  # jaxft.evaluate rebuilds the run
    assert evaluated_reward(tmp_path, go, straight) == pytest.approx(final["eval/reward"], abs=1e-6)


# slow: a critic sharded over a 2 x 2 x 2 mesh with micro-batches is checked in
# test_cli_separate_critic_trains_resumes_exactly_and_is_never_exported, an NF4 base on 8 devices in
# test_quant.py::test_qlora_cli_one_vs_eight_devices; this is the two together.
@pytest.mark.slow
def test_lora_critic_beside_a_qlora_policy_on_eight_devices(tmp_path, run):  # noqa: F811
    """The run above on a 2 x 2 x 2 mesh with micro-batches: the same figures as one device."""
    assert_eight_devices_match_one(tmp_path, lora_critic_beside_qlora(tmp_path, run)[2])


def test_a_lora_critics_frozen_projections_are_quantized_as_the_policys_base(hf_pair, tmp_path):  # noqa: F811
    """model.quantization stores the frozen projections of a LoRA critic as the policy's (found by the
    critic's family), never its trained leaves; without the critic's model they stay as they are."""
    from flax import linen as nn

    from jaxft.quant import Quantized
    from jaxft.train import quantize_base

    (_, _, _), (_, model, params) = hf_pair
    critic_dir = build_hf(tmp_path, transformers.LlamaConfig(**{**BASE, "num_labels": 1}),
                          "LlamaForSequenceClassification", sub="critic")[1]
    objective = ppo.objective(ppo.Settings(critic=str(critic_dir), critic_method="lora"), 1.0, model.cfg)
    critic = objective.own_model.model
    own = nn.unbox(critic.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    trains, frozen = objectives.split_own(objective, {"critic": own})
    config = base_config()
    config.model.quantization = "nf4"
    tree = {**params, objectives.OWN: frozen}
    out = flat(quantize_base(config, model.cfg, tree, objective.own_model))
    quantized = {p for p, x in out.items() if isinstance(x, Quantized)}
    want = {p for p in flat(tree) if re.search(r"(q|k|v|o|gate|up|down)_proj/kernel$", p)}
    assert quantized == want and any(p.startswith("objective/critic/") for p in want), quantized ^ want
    assert flat(trains)  # the critic's factors and score head: trainable, never in the frozen tree
    alone = flat(quantize_base(config, model.cfg, tree))  # no model given: the critic's weights as they were
    assert {p for p, x in alone.items() if isinstance(x, Quantized)} == {p for p in want if p.startswith("layers")}


def test_mfu_counts_a_lora_policy_and_its_critic(tmp_path, run, monkeypatch):  # noqa: F811
    """train/mfu's FLOPs: a LoRA policy's frozen base costs 4N per token whatever the objective's own
    parameters (the value head, a critic) are, and a separate critic adds its own full training, 6N."""
    from test_loop import tiny_config

    from jaxft import flops, train

    config = tiny_config()
    for arg in (*ppo_run(run), "--config.method.name=lora", "--config.train.steps=2", "--config.export.enabled=False",
                "--config.eval.every_steps=0", "--config.checkpoint.every_steps=2"):
        key, value = arg[len("--config."):].split("=", 1)
        *path, name = key.split(".")
        node = functools.reduce(lambda d, k: d[k], path, config)
        node[name] = (value == "True") if isinstance(node[name], bool) else type(node[name])(value)
    critic = transformers.LlamaConfig(**{**BASE, "vocab_size": 300, "num_labels": 1})
    critic_dir = build_hf(tmp_path, critic, "LlamaForSequenceClassification", sub="critic")[1]
    made, real_init = [], flops.Throughput.__init__

    def init(self, *args, **kw):
        made.append(self)
        real_init(self, *args, **kw)

    monkeypatch.setattr(flops.Throughput, "__init__", init)
    for own in ("", str(critic_dir)):
        config.train.ppo_critic = own
        train.train_and_evaluate(config, str(tmp_path / f"run{len(made)}"))
        t = made[-1]
        assert not t.trains_base and t.adapter > 0 and t._per_token
        cfg = hf.config_from_dict(config.model.init.to_dict(), "model.init")
        for (width, head_width), per_token in t._per_token.items():
            want = flops.train_flops_per_token(cfg, width, trains_base=False, adapter_weights=t.adapter)
            if own:
                want += flops.train_flops_per_token(hf.read_config(critic_dir).replace(num_labels=1), width,
                                                    trains_base=True)
            assert per_token == pytest.approx(want, rel=1e-12)


# slow: the mesh x objective matrix keeps GRPO on a decoder (test_grpo.py::test_eight_devices_and_micro_batches_
# match_one_device: the rollouts spread over the devices) and PPO on T5 (test_grpo_seq2seq.py::test_ppo_eight_
# devices_and_micro_batches_match_one_device: the value head, grpo_iterations=2 and the whitening over the whole
# batch across devices and micro-batches) in the default run.
@pytest.mark.slow
def test_eight_devices_and_micro_batches_match_one_device(tmp_path, run):  # noqa: F811
    """Advantages are whitened over the whole batch, wherever its rows are."""
    assert_eight_devices_match_one(tmp_path, (*ppo_run(run), "--config.train.steps=4", "--config.export.enabled=False",
                                              "--config.eval.batch_size=16", "--config.checkpoint.every_steps=4"))


def test_cli_bad_ppo_settings_are_one_line(tmp_path, run):  # noqa: F811
    for bad, message in ((("--config.train.ppo_lam=1.5",), "train.ppo_lam=1.5: expected 0 <= lam <= 1"),
                         (("--config.train.ppo_value_clip=0",), "train.ppo_value_clip=0.0: expected > 0"),
                         (("--config.train.grpo_generations=0",), "train.grpo_generations=0: expected a positive"),
                         (("--config.method.name=lora", "--config.method.targets=q_proj,lm_head"), "PPO's value head reads the model's final "
                                                                        "hidden states")):
        r = cli(tmp_path / "run", *ppo_run(run), "--config.train.steps=4", *bad)
        assert r.returncode == 2 and r.stderr.startswith("error: " + message), r.stderr
        assert not (tmp_path / "run").exists()


def test_ppo_config_runs_and_exports(tmp_path):
    r = cli(tmp_path, "--config.train.steps=2", "--config.data.max_train_examples=64", "--config.eval.every_steps=0",
            "--config.eval.generate_examples=8", "--config.checkpoint.every_steps=2",
            "--config.train.grpo_max_new_tokens=8", "--config.eval.max_new_tokens=8",
            "--config.optimizer.warmup_steps=0", config="configs/ppo_lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: eval/reward=" in r.stdout and "train/value_loss=" in r.stdout
    assert (tmp_path / "export" / "adapter_model.safetensors").exists()
