"""Adapters, IA3, DoRA, AdaLoRA and LoRA merging, against HF PEFT where it defines the method."""

import copy
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model

from jaxft import hf
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft import Method, adalora, build, lora
from jaxft.peft.hf_peft import save_adapter
from jaxft.peft.partition import added_params, base_params, flat, merge, split, unflat
from jaxft.step import TrainState, make_optimizer, make_train_step
from test_peft import batch, hooked, method_cfg, torch_logits, torch_models  # noqa: F401 (fixture)

DORA = dict(name="lora", dora=True, rank=4, alpha=8.0, targets="q_proj,v_proj,down_proj")
IA3 = dict(name="ia3")
ADALORA = dict(name="adalora", init_r=4, target_r=2, alpha=8.0, targets="q_proj,v_proj,o_proj")
HOULSBY = dict(name="adapter", adapter_size=8, adapter_type="houlsby")
PFEIFFER = dict(name="adapter", adapter_size=8, adapter_type="pfeiffer", adapter_activation="gelu")


def close(a, b):
    """Within 1e-5 relative (of the larger logit's size: PEFT and jaxft sum products in other orders)."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def drop_ranks(params):
    """Set some AdaLoRA singular values to zero, as a budget allocation does: a rank pattern to keep."""
    f = flat(params)
    for p in f:
        if p.endswith("adalora_e"):
            e = np.array(f[p])
            e[0, :2] = 0.0  # layer 0 keeps 2 of 4, layer 1 all 4
            f[p] = jnp.asarray(e)
    return unflat(f)


# ---------------------------------------------------------------------------------------------
# HF PEFT both ways.


# Each method's export is checked on the classifier; the causal LM's on IA3 ([ia3-causal]).
# slow: [dora-causal] and [adalora-causal] repeat the causal LM's positions [ia3-causal] checks, and each
# method's export (AdaLoRA's rank pattern included) that [dora-cls] and [adalora-cls] check.
@pytest.mark.parametrize("method_kw,kind", [
    pytest.param(m, k, id=f"{i}-{k}", marks=pytest.mark.slow if k == "causal" and i != "ia3" else ())
    for m, i in [(DORA, "dora"), (IA3, "ia3"), (ADALORA, "adalora")] for k in ["causal", "cls"]])
def test_export_loads_in_peft(torch_models, tmp_path, kind, method_kw):
    base, base_dir = torch_models[kind]
    model, method, params = hooked(base_dir, method_kw)
    if method_kw["name"] == "adalora":
        params = drop_ranks(params)
    trainable, _ = split(params, method.trainable)
    save_adapter(model, method, trainable, tmp_path / "a")
    ids, mask = batch()
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ref = torch_logits(peft_model, ids, mask)
    real = mask.astype(bool) if kind == "causal" else slice(None)
    assert np.abs(ref[real] - torch_logits(base, ids, mask)[real]).max() > 1e-3  # the adapter matters
    close(ours[real], ref[real])
    if method_kw["name"] == "adalora":  # PEFT resized each module to its rank pattern
        layers = peft_model.base_model.model.model.layers
        assert layers[0].self_attn.q_proj.lora_E["default"].shape[0] == 2
        assert layers[1].self_attn.q_proj.lora_E["default"].shape[0] == 4
    model2, params2 = hf.load(base_dir, adapter=str(tmp_path / "a"))  # and back
    close(np.asarray(model2.apply({"params": params2}, ids, mask))[real], ours[real])
    if method_kw["name"] == "adalora":
        assert adalora.rank_count(params2) == adalora.rank_count(params) == 3 * (2 + 4)


def peft_saved(base, config, out, seed=0):
    """A PEFT adapter with random (non-initial) weights, saved by PEFT."""
    torch.manual_seed(seed)
    m = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and "score" not in n:
                p.copy_((torch.randn_like(p) * 0.3 + (1.0 if ("ia3_l" in n or "magnitude" in n) else 0.0)))
    m.save_pretrained(out)
    return m.eval()


@pytest.mark.parametrize("kind", ["causal", "cls"])
@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_peft_adapter_loads_in_jaxft(torch_models, tmp_path, kind, name):
    base, base_dir = torch_models[kind]
    task = "CAUSAL_LM" if kind == "causal" else "SEQ_CLS"
    config = (LoraConfig(task_type=task, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
              if name == "dora" else IA3Config(task_type=task))
    peft_model = peft_saved(base, config, tmp_path / "a")
    ids, mask = batch()
    ref = torch_logits(peft_model, ids, mask)
    model, params = hf.load(base_dir, adapter=str(tmp_path / "a"))
    real = mask.astype(bool) if kind == "causal" else slice(None)
    close(np.asarray(model.apply({"params": params}, ids, mask))[real], ref[real])


PATTERNS = {
    "rank": dict(rank_pattern={"q_proj": 2}),
    "alpha": dict(alpha_pattern={"v_proj": 32}),
    "one_layer": dict(rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"layers.0.mlp.down_proj": 2}),
    "rslora": dict(use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3}),
    "dora": dict(use_dora=True, rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 16}),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_peft_lora_rank_and_alpha_patterns(torch_models, tmp_path, name):
    """PEFT's rank_pattern / alpha_pattern give some modules (or one layer's) their own rank and scale;
    jaxft loads such an adapter with PEFT's logits, and its export loads back in PEFT with them (was:
    alpha_pattern ignored, wrong logits; rank_pattern a shape error)."""
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        **PATTERNS[name])
    lora_round_trip(torch_models["causal"], config, tmp_path, r"/lora_(a|b|magnitude)$")


def lora_round_trip(torch_model, config, tmp_path, trainable: str, scan: bool = True):
    """A PEFT-saved LoRA adapter loads in jaxft with PEFT's logits, and jaxft's export of it loads back
    in PEFT with them."""
    base, base_dir = torch_model
    ids, mask = batch()
    real = mask.astype(bool)
    ref = torch_logits(peft_saved(base, config, tmp_path / "a"), ids, mask)[real]
    model, params = hf.load(base_dir, adapter=str(tmp_path / "a"), scan_layers=scan)
    close(np.asarray(model.apply({"params": params}, ids, mask))[real], ref)
    method = Method("lora", (trainable,), model.hooks)
    save_adapter(model, method, split(params, method.trainable)[0], tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    close(torch_logits(again, ids, mask)[real], ref)


def test_peft_lora_on_the_lm_head_loads(torch_models, tmp_path):
    """PEFT saves the LM head it puts LoRA on as `lm_head.base_layer.weight` beside its factors: jaxft
    reads it as the head's weight, with PEFT's logits (was: 'not a weight of this llama model')."""
    base, base_dir = torch_models["causal"]
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    ids, mask = batch()
    real = mask.astype(bool)
    ref = torch_logits(peft_saved(base, config, tmp_path / "a"), ids, mask)[real]
    model, params = hf.load(base_dir, adapter=str(tmp_path / "a"))
    close(np.asarray(model.apply({"params": params}, ids, mask))[real], ref)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
                                dict(target_modules=r"model\.layers\.1\.self_attn\.q_proj|.*\.0\.mlp\.down_proj")],
                         ids=["layers_to_transform", "regex"])
def test_peft_lora_on_some_layers(torch_models, tmp_path, kw, scan):
    """LoRA on some layers only (PEFT's layers_to_transform, or a regex naming layers): the others get
    zero factors, so jaxft gives PEFT's logits, scanned or not, and its export loads back in PEFT with
    them (was: 'expected one per layer ... not supported')."""
    lora_round_trip(torch_models["causal"], LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, **kw), tmp_path,
                    r"/lora_[ab]$", scan)


def test_peft_ia3_on_some_layers(torch_models, tmp_path):
    """IA3 on one layer of two (a regex on layer 1): the other scales by one, PEFT's logits (was: 'has an
    adapter in some layers only')."""
    base, base_dir = torch_models["cls"]
    config = IA3Config(task_type="SEQ_CLS", target_modules=r".*\.1\.(self_attn\.k_proj|mlp\.down_proj)",
                       feedforward_modules=r".*\.1\.mlp\.down_proj")
    ids, mask = batch()
    ref = torch_logits(peft_saved(base, config, tmp_path / "a"), ids, mask)
    model, params = hf.load(base_dir, adapter=str(tmp_path / "a"))
    close(np.asarray(model.apply({"params": params}, ids, mask)), ref)


@pytest.mark.parametrize("kw,match", [
    (dict(target_modules=["q_proj", "embed_tokens"]), "LoRA on an embedding layer, not supported"),
    (dict(target_modules=["q_proj"], lora_bias=True), r"a LoRA bias \(lora_bias=True\), not supported"),
    (dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]), "trainable tokens' rows"),
    (dict(target_modules=["q_proj"], layers_to_transform=[1], use_dora=True), "in some layers only"),
], ids=["embedding", "lora_bias", "trainable_tokens", "dora_some_layers"])
def test_peft_lora_parts_jaxft_lacks_are_one_error(torch_models, tmp_path, kw, match):
    """A PEFT LoRA adapter holding what jaxft's LoRA cannot compute is refused in one line naming it
    (was: '...base_layer.weight is not a weight of this llama model')."""
    base, base_dir = torch_models["causal"]
    peft_saved(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, **kw), tmp_path / "a")
    with pytest.raises(JaxftError, match=match):
        hf.load(base_dir, adapter=str(tmp_path / "a"))


def test_peft_adalora_rank_pattern_survives(torch_models, tmp_path):
    """PEFT trains AdaLoRA with its own allocator until the budget is final; jaxft loads the saved
    adapter with PEFT's logits and rank pattern, and its export loads back in PEFT with both."""
    base, base_dir = torch_models["cls"]
    torch.manual_seed(0)
    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6,
                           lora_alpha=8, target_modules=["q_proj", "v_proj"])
    m = get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1])
    for step in range(6):
        out = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels)
        out.loss.backward()
        opt.step()
        m.base_model.update_and_allocate(step)
        opt.zero_grad()
    m.save_pretrained(tmp_path / "peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(map(sum, pattern.values())) == 2 * 4  # target_r per module, over 4 modules
    ref = torch_logits(m.eval(), ids, mask)
    model, params = hf.load(base_dir, adapter=str(tmp_path / "peft"))
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    close(ours, ref)
    assert adalora.rank_count(params) == 8
    method = Method("adalora", (adalora.TRAINABLE, r"^score/"), model.hooks)
    trainable, _ = split(params, method.trainable)
    save_adapter(model, method, trainable, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"]
    assert written == pattern
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    close(torch_logits(again, ids, mask), ref)


# ---------------------------------------------------------------------------------------------
# The methods themselves.


def fresh(base_dir, method_kw, steps=0, **overrides):
    """A method's model at its initialisation, over loaded base weights (as jaxft.train starts it)."""
    model, params = hf.load(base_dir, **overrides)
    method = build(method_cfg(**method_kw), model.cfg, steps=steps)
    hooked_model = family.build(model.cfg, method.hooks)
    init = nn.unbox(hooked_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = merge(params, added_params(init))
    for hook in method.hooks:
        params = hook.initialize(hooked_model, params, {})
    return model, hooked_model, method, params, hf.load(base_dir)[1]


@pytest.mark.parametrize("method_kw", [DORA, IA3, ADALORA, HOULSBY, PFEIFFER],
                         ids=["dora", "ia3", "adalora", "houlsby", "pfeiffer"])
def test_training_starts_at_the_base_model(torch_models, method_kw):
    _, base_dir = torch_models["causal"]
    model, hooked_model, method, params, plain = fresh(base_dir, method_kw)
    ids, mask = batch()
    close(np.asarray(hooked_model.apply({"params": params}, ids, mask)),
          np.asarray(model.apply({"params": plain}, ids, mask)))
    assert flat(base_params(params)).keys() == flat(plain).keys()  # the method's leaves are all "added"


def test_bottleneck_adapters_where_they_belong(torch_models, tmp_path):
    _, base_dir = torch_models["causal"]
    for kw, expect in ((HOULSBY, {"adapter_attention", "adapter_mlp"}), (PFEIFFER, {"adapter_mlp"})):
        model, method, params = hooked(base_dir, kw)
        trainable, _ = split(params, method.trainable)
        assert set(trainable["layers"]) == expect
        assert trainable["layers"]["adapter_mlp"]["down_kernel"].shape == (2, 64, 8)
        save_adapter(model, method, trainable, tmp_path / kw["adapter_type"])
        config = json.loads((tmp_path / kw["adapter_type"] / "adapter_config.json").read_text())
        assert config["peft_type"] == "JAXFT_BOTTLENECK" and config["adapter_type"] == kw["adapter_type"]
        model2, params2 = hf.load(base_dir, adapter=str(tmp_path / kw["adapter_type"]))
        ids, mask = batch()
        ours = np.asarray(model.apply({"params": params}, ids, mask))
        np.testing.assert_array_equal(np.asarray(model2.apply({"params": params2}, ids, mask)), ours)
        # By hand for one block: h + up(act(down(h))) on the MLP output, read through intermediates.
        a = flat(params)
        h = np.random.RandomState(1).randn(3, 64).astype(np.float32)
        act = {"relu": lambda z: np.maximum(z, 0), "gelu": lambda z: z * 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))}[
            kw.get("adapter_activation", "relu")]
        want = h + act(h @ a["layers/adapter_mlp/down_kernel"][1] + a["layers/adapter_mlp/down_bias"][1]) @ \
            a["layers/adapter_mlp/up_kernel"][1] + a["layers/adapter_mlp/up_bias"][1]
        from jaxft.peft.adapter import Bottleneck

        got = Bottleneck(8, kw.get("adapter_activation", "relu"), 0.01).apply(
            {"params": {k.split("/")[-1]: v[1] for k, v in a.items() if "adapter_mlp" in k}}, h)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_merge_unmerge(torch_models, dora):
    _, base_dir = torch_models["cls"]
    kw = dict(name="lora", rank=4, alpha=8.0, dora=dora, targets="q_proj,v_proj,o_proj,down_proj")
    model, method, params = hooked(base_dir, kw)
    (hook,) = method.hooks
    ids, mask = batch()
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    merged = lora.merge(params, hook)
    plain = family.build(model.cfg)  # no LoRA hook: the merged kernels carry the adapter
    close(np.asarray(plain.apply({"params": base_params(merged)}, ids, mask)), ours)
    assert np.abs(np.asarray(plain.apply({"params": base_params(params)}, ids, mask)) - ours).max() > 1e-3
    back = lora.unmerge(merged, hook)
    assert flat(back).keys() == flat(params).keys()
    for k, v in flat(params).items():
        np.testing.assert_allclose(np.asarray(flat(back)[k]), np.asarray(v), rtol=0, atol=2e-6)


def test_merge_refuses_a_quantized_base(torch_models):
    from jaxft import quant
    from jaxft.errors import JaxftError

    _, base_dir = torch_models["causal"]
    model, method, params = hooked(base_dir, dict(name="lora", targets="q_proj"))
    trainable, frozen = split(params, method.trainable)
    with pytest.raises(JaxftError, match="quantized base"):
        lora.merge(merge(trainable, quant.quantize_params(frozen, "int8")), method.hooks[0])


def test_dora_on_a_quantized_base_matches_its_dequantized_twin(torch_models):
    from jaxft import quant

    _, base_dir = torch_models["causal"]
    model, method, params = hooked(base_dir, DORA)
    trainable, frozen = split(params, method.trainable)
    q = quant.quantize_params(frozen, "nf4")
    ids, mask = batch()
    got = model.apply({"params": merge(trainable, q)}, ids, mask)
    want = model.apply({"params": merge(trainable, quant.dequantize_params(q))}, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Training.


def train(base_dir, method_kw, steps, lr=1e-2, total=None):
    """`steps` train steps through make_train_step on one fixed causal-LM batch -> (losses, trainable)."""
    model, hooked_model, method, params, _ = fresh(base_dir, method_kw, steps=total or steps)
    trainable, frozen = split(params, method.trainable)
    from jaxft.config import base_config
    from jaxft.peft.methods import init_method_state

    opt = base_config().optimizer
    opt.learning_rate, opt.warmup_steps, opt.schedule = lr, 0, "constant"
    tx, schedule = make_optimizer(opt, steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0), method_state=init_method_state(hooked_model.hooks, trainable))
    step = jax.jit(make_train_step(hooked_model, tx, schedule, 1))
    ids = np.random.RandomState(2).randint(1, 96, (4, 12))
    b = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids, "weight": np.ones(4, np.float32)}
    out, ranks = [], []
    for _ in range(steps):
        state, metrics = step(state, frozen, b)
        out.append(float(metrics["loss"]))
        ranks.append(adalora.rank_count(state.params) if method_kw["name"] == "adalora" else None)
    return out, state, ranks


# slow: [dora] and [houlsby]: that a few jitted train steps lower the loss is checked for each method on llama in
# tests/test_family_methods.py::test_method_on_family[llama-dora] and [llama-houlsby]; [ia3] stays here.
@pytest.mark.parametrize("method_kw,lr", [pytest.param(DORA, 1e-2, marks=pytest.mark.slow), (IA3, 1e-1),
                                          pytest.param(HOULSBY, 1e-2, marks=pytest.mark.slow)],
                         ids=["dora", "ia3", "houlsby"])
def test_methods_train(torch_models, method_kw, lr):
    losses, _, _ = train(torch_models["causal"][1], method_kw, 15, lr=lr)  # IA3's few scales: a larger step
    assert losses[-1] < losses[0] - 0.05, losses


def test_adalora_trains_and_reaches_its_budget_on_schedule(torch_models):
    kw = dict(ADALORA, tinit=2, tfinal=4, delta_t=2)  # 3 targets x 2 layers, 4 -> 2 ranks each
    losses, state, ranks = train(torch_models["causal"][1], kw, 14, lr=3e-2)
    assert losses[-1] < losses[0] - 0.03, losses
    modules = 6
    budgets, allocate = adalora.schedule(adalora.AdaLoraHook(4, 2, tinit=2, tfinal=4, delta_t=2), 14, modules)
    assert ranks[1] == 4 * modules  # no allocation before tinit (Λ left zero-init trained away from 0)
    for step in range(14):
        if allocate[step] or step > 10:
            assert ranks[step] <= budgets[step], (step, ranks[step], budgets[step])
    assert ranks[10] == ranks[-1] == 2 * modules  # the final budget from total - tfinal on
    assert set(state.method_state["0"]) == {"ipt", "unc", "keep"}  # the allocator's state, in the train state


def test_adalora_allocator_matches_peft(torch_models):
    """The same parameters and gradients step by step through PEFT's RankAllocator and through
    `adalora.update`: the same singular values are masked at the same steps."""
    base, base_dir = torch_models["causal"]
    total, tinit, tfinal, dt = 12, 2, 3, 2
    m = get_peft_model(copy.deepcopy(base), AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, tinit=tinit,
                                                         tfinal=tfinal, deltaT=dt, total_step=total,
                                                         target_modules=["q_proj", "v_proj"]))
    hook = adalora.AdaLoraHook(4, 2, targets="q_proj,v_proj", tinit=tinit, tfinal=tfinal, delta_t=dt)
    rng = np.random.RandomState(0)
    torch_params = {n: p for n, p in m.named_parameters() if "lora_" in n}
    shapes = {"adalora_a": (2, 64, 4), "adalora_e": (2, 4), "adalora_b": {"q_proj": (2, 4, 64), "v_proj": (2, 4, 32)}}

    def ours_to_torch(name, layer, proj, v):
        key = f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{name[-1].upper()}.default"
        return key, (v.T if name != "adalora_e" else v[:, None])

    state = {k: None for k in ("ipt", "unc", "keep")}
    masked = 0
    for step in range(total):
        tree, grads = {}, {}
        for proj in ("q_proj", "v_proj"):
            for name in ("adalora_a", "adalora_e", "adalora_b"):
                shape = shapes[name][proj] if name == "adalora_b" else shapes[name]
                p, g = rng.randn(*shape).astype(np.float32), rng.randn(*shape).astype(np.float32)
                tree[f"layers/self_attn/{proj}/{name}"], grads[f"layers/self_attn/{proj}/{name}"] = p, g
                for layer in range(2):
                    key, pt = ours_to_torch(name, layer, proj, p[layer])
                    _, gt = ours_to_torch(name, layer, proj, g[layer])
                    with torch.no_grad():
                        torch_params[key].copy_(torch.tensor(pt))
                    torch_params[key].grad = torch.tensor(gt).clone()
        if state["ipt"] is None:
            zeros = {k: np.zeros_like(v) for k, v in tree.items()}
            state = {"ipt": unflat(zeros), "unc": unflat(zeros), "keep": unflat({k: np.ones_like(v) for k, v in tree.items()})}
        state, new = adalora.update(state, unflat(tree), unflat(grads), jnp.int32(step), hook, total)
        m.base_model.update_and_allocate(step)
        zeros = 0
        for proj in ("q_proj", "v_proj"):
            e = np.asarray(flat(new)[f"layers/self_attn/{proj}/adalora_e"])
            zeros += int((e == 0).sum())
            for layer in range(2):
                key, _ = ours_to_torch("adalora_e", layer, proj, e[layer])
                np.testing.assert_allclose(e[layer], torch_params[key].detach().numpy()[:, 0], rtol=1e-6,
                                           err_msg=f"step {step} {key}")
        masked += zeros
    assert masked > 0 and zeros == 16 - 8  # it did mask; at the end the budget: 2 ranks x 4 modules of 16


def test_adalora_trains_through_the_cli_and_resumes(tmp_path):
    """AdaLoRA's allocator state is in the optimizer state: checkpointed, resumed, exported for PEFT."""
    from test_train import cli, losses

    args = ("--config.method.name=adalora", "--config.method.init_r=4", "--config.method.target_r=2",
            "--config.method.tinit=2", "--config.method.tfinal=3", "--config.train.log_every_steps=1")
    r = cli(tmp_path / "w", *args)
    assert r.returncode == 0, r.stderr
    seen = losses(tmp_path / "w")
    assert seen[8] < seen[1]
    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "w" / "export" / "adapter_model.safetensors"))
    es = [v for k, v in written.items() if k.endswith("lora_E")]
    assert len(es) == 4 and sum(e.shape[0] for e in es) == 2 * 4  # the final budget: target_r per module
    config = json.loads((tmp_path / "w" / "export" / "adapter_config.json").read_text())
    assert sum(map(sum, config["rank_pattern"].values())) == 8
    again = cli(tmp_path / "w", *args)  # restores the final checkpoint, allocator state included
    assert again.returncode == 0 and "resuming from step 8" in again.stdout, again.stderr
    rewritten = load_file(str(tmp_path / "w" / "export" / "adapter_model.safetensors"))
    assert rewritten.keys() == written.keys()
    for k in written:
        np.testing.assert_array_equal(rewritten[k], written[k])


def test_loraplus_matches_peft(torch_models, tmp_path):
    """optimizer.lr_multipliers="lora_b=16" is LoRA+ (Hayou et al. 2024) as PEFT's create_loraplus_optimizer
    builds it: lora_B at 16x the learning rate, its weight decay scaled with it, lora_A and the classifier head
    at the plain rate. Three AdamW steps from one random adapter: every trained weight against PEFT's."""
    from peft.optimizers import create_loraplus_optimizer

    from jaxft.config import base_config
    from jaxft.objectives import classification_loss

    base, base_dir = torch_models["cls"]
    torch.manual_seed(0)
    m = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.save_pretrained(tmp_path / "start")
    ids, mask = batch()
    labels = np.array([0, 1, 1])
    opt = create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    for _ in range(3):
        m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.backward()
        opt.step()
        opt.zero_grad()
    m.save_pretrained(tmp_path / "peft")

    model, params = hf.load(base_dir, adapter=str(tmp_path / "start"))
    trainable, frozen = split(params, (r"lora_", r"^score/"))
    c = base_config().optimizer
    c.learning_rate, c.schedule, c.weight_decay, c.grad_clip, c.lr_multipliers = 1e-3, "constant", 0.01, 0.0, "lora_b=16"
    tx, _ = make_optimizer(c, 3)
    state = tx.init(trainable)
    batch_ = {"labels": labels, "weight": np.ones(3, np.float32)}

    def loss(t):
        sums = classification_loss(model.apply({"params": merge(t, frozen)}, ids, mask), batch_)
        return sums["loss_sum"] / sums["count"]

    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
        trainable = jax.tree_util.tree_map(lambda p, u: p + u, trainable, updates)
    want = flat(split(hf.load(base_dir, adapter=str(tmp_path / "peft"))[1], (r"lora_", r"^score/"))[0])
    got, start = flat(trainable), flat(split(params, (r"lora_", r"^score/"))[0])
    assert got.keys() == want.keys() and any(k.endswith("lora_b") for k in got)
    for k in got:
        moved = np.abs(np.asarray(want[k]) - np.asarray(start[k])).max()
        assert moved > 1e-4, k  # every leaf trained (B at 16x: far more than A)
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-3 * moved, err_msg=k)
