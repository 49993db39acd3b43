"""LoRA's starts, PEFT's `init_lora_weights`: PiSSA and OLoRA split each target weight into a residual and
the adapter's first factors, as PEFT splits it; a trained adapter exports as PEFT's conversion to a plain one
on the original base, and an adapter PEFT saved unconverted loads as PEFT loads it."""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hooked_models import method_cfg
from peft import LoraConfig, PeftModel, get_peft_model
from test_train import assert_resumes_exactly, cli

from jaxft import hf, quant
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft import build
from jaxft.peft.lora import svd_lowrank
from jaxft.peft.methods import default_lora_targets
from jaxft.peft.partition import added_params, flat, merge, unflat

V = 96
IDS = np.random.RandomState(0).randint(3, V, (2, 8))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (transformers model, its directory): a Llama (GQA) and a GPT-2 (fused c_attn, Conv1D)."""
    out = {}
    for name, config in [("llama", transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)),
            ("gpt2", transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                               bos_token_id=1, eos_token_id=2))]:
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(config).eval()
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out[name] = (m, d)
    return out


def started(directory, **method):
    """(model, method, params) as training starts them: the base loaded, the method's leaves, `initialize`."""
    base, params = hf.load(directory)
    built = build(method_cfg(name="lora", rank=4, alpha=8.0, **method), base.cfg)
    model = family.build(base.cfg, built.hooks)
    fresh = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = merge(params, added_params(fresh))
    for hook in built.hooks:
        params = hook.initialize(model, params, None)
    return model, built, params


def logits(model, params):
    return np.asarray(model.apply({"params": params}, IDS))


def torch_logits(m):
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.numpy()


def as_hf(cfg, path: str, kernel) -> np.ndarray:
    """A [in, out] matrix at a kernel's path, under HF's name and layout (GPT-2's c_attn order, Conv1D)."""
    (value,) = hf.params_to_hf(unflat({path: np.asarray(kernel)}), cfg).values()
    return value


@pytest.mark.parametrize("name, init", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_split_is_peft_split(bases, name, init):
    """Each target's residual weight and starting product s BA equal PEFT's (the factors themselves are
    unique up to signs); the model starts at the base's logits."""
    m, d = bases[name]
    model, method, params = started(d, init_lora_weights=init)
    np.testing.assert_allclose(logits(model, params), torch_logits(m), atol=2e-6)
    targets = default_lora_targets(model.cfg)
    peft_model = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules=targets.split(","),
                                                             init_lora_weights=init))
    theirs = dict(peft_model.named_parameters())
    f, scale, checked = flat(params), method.hooks[0].scale, 0
    for path in [p for p in f if p.endswith("/lora_a")]:
        mod = path[: -len("lora_a")]
        for layer in range(2):
            name_ = next(iter(hf.params_to_hf(unflat({mod + "kernel": np.asarray(f[mod + "kernel"])[layer:layer + 1]}),
                                              model.cfg)))
            name_ = name_.replace(".0.", f".{layer}.", 1)[: -len(".weight")]
            peft_name = "base_model.model." + name_
            residual = theirs[peft_name + ".base_layer.weight"].detach().numpy()
            product = scale * (theirs[peft_name + ".lora_B.default.weight"] @
                               theirs[peft_name + ".lora_A.default.weight"]).detach().numpy()
            ours_residual = as_hf(model.cfg, mod + "kernel", np.asarray(f[mod + "kernel"])[layer:layer + 1])
            ab = scale * np.asarray(f[mod + "lora_a"][layer] @ f[mod + "lora_b"][layer])
            ours_product = as_hf(model.cfg, mod + "kernel", ab[None])
            if name == "gpt2":  # Conv1D keeps its weight [in, out]; PEFT's BA is [out, in] still
                product = product.T
            np.testing.assert_allclose(ours_residual, residual, atol=1e-6)
            np.testing.assert_allclose(ours_product, product, atol=1e-6)
            assert np.abs(product).max() > 1e-2  # the split moved something
            np.testing.assert_array_equal(np.asarray(f[mod + "lora_a0"]), np.asarray(f[mod + "lora_a"]))
            checked += 1
    assert checked == 4 if name == "llama" else 2


# PiSSA on a plain adapter; OLoRA with rsLoRA (the exported alpha keeps its scale: times sqrt 2); PiSSA with DoRA.
# slow: [pissa-dora]: the conversion is DoRA's export with [pissa]'s factors (DoRA's export:
# test_family_methods.py::test_method_on_family[llama-dora]).
@pytest.mark.parametrize("init, extra", [("pissa", {}), ("olora", {"rslora": True}),
                                         pytest.param("pissa", {"dora": True}, marks=pytest.mark.slow)],
                         ids=["pissa", "olora-rslora", "pissa-dora"])
def test_trained_adapter_exports_converted(bases, tmp_path, init, extra):
    """After training (here: the factors moved at random), the export is PEFT's conversion
    (`path_initial_model_for_weight_conversion`): a rank-2r adapter [A; A0], [B, -B0] that PEFT applies to the
    original base with our logits, and jaxft loads back alike."""
    m, d = bases["llama"]
    model, method, params = started(d, init_lora_weights=init, **extra)
    f = flat(params)
    for i, k in enumerate(k for k in f if k.endswith(("/lora_a", "/lora_b", "/lora_magnitude"))):
        f[k] = f[k] + 0.05 * jax.random.normal(jax.random.PRNGKey(i), f[k].shape)
    params = unflat(f)
    ours = logits(model, params)
    assert np.abs(ours - torch_logits(m)).max() > 1e-3  # the adapter changed the model
    out = hf.save_adapter(model, params, tmp_path / "adapter", base=str(d))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * np.sqrt(2) if extra.get("rslora") else 16)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(m), out).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-5)
    again, again_params = hf.load(d, adapter=str(out))
    np.testing.assert_allclose(logits(again, again_params), ours, atol=1e-5)


def test_unconverted_peft_adapter_loads_as_peft_loads_it(bases, tmp_path):
    """PEFT saves a PiSSA adapter as trained (its factors apply to the residual) unless told to convert it,
    and splits the base again when it loads one: jaxft reads it with PEFT's logits, and exports it converted."""
    m, d = bases["llama"]
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights="pissa"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    ref = torch_logits(PeftModel.from_pretrained(copy.deepcopy(m), tmp_path / "peft").eval())
    model, params = hf.load(d, adapter=str(tmp_path / "peft"))
    assert model.hooks[0].init == "pissa"
    np.testing.assert_allclose(logits(model, params), ref, atol=1e-5)
    out = hf.save_adapter(model, params, tmp_path / "converted", base=str(d))
    np.testing.assert_allclose(torch_logits(PeftModel.from_pretrained(copy.deepcopy(m), out).eval()), ref, atol=1e-5)


def test_pissa_residual_quantizes_with_less_error(bases):
    """QPiSSA (PiSSA's section 4.2): the residual, without the top singular part, quantizes to NF4 with less
    error in W than W itself; training quantizes the residual, after the split (`train.quantize_base`)."""
    _, d = bases["llama"]
    model, method, params = started(d, init_lora_weights="pissa")
    original = flat(hf.load(d)[1])
    f, scale = flat(params), method.hooks[0].scale
    for mod in [p[: -len("lora_a")] for p in f if p.endswith("/lora_a")]:
        w = np.asarray(original[mod + "kernel"])
        start = scale * np.asarray(f[mod + "lora_a0"] @ f[mod + "lora_b0"])
        q = lambda x: np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), "nf4", batch_dims=1)))  # noqa: E731
        assert np.abs(w - q(np.asarray(f[mod + "kernel"])) - start).mean() < np.abs(w - q(w)).mean()


def test_randomised_svd_converges_to_the_exact_one():
    """pissa_niter_N's sketch (torch.svd_lowrank's algorithm, jax's random draws): its top part nears the
    exact SVD's as the power iterations grow, on a decaying spectrum as trained weights have."""
    rng = np.random.RandomState(0)
    u, _ = np.linalg.qr(rng.randn(64, 64))
    v, _ = np.linalg.qr(rng.randn(256, 256))
    s = 1.0 / (1 + np.arange(64)) ** 0.7
    w = ((u * s) @ v[:64]).astype(np.float32)
    uu, ss, vh = np.linalg.svd(w)
    exact = (uu[:, :4] * ss[:4]) @ vh[:4]
    errors = []
    for niter in (1, 16):
        a, b, c = svd_lowrank(jnp.asarray(w), 4, niter, jax.random.PRNGKey(0))
        errors.append(np.abs(np.asarray((a * b) @ c) - exact).max() / np.abs(exact).max())
    assert errors[1] < 0.05 < errors[0], errors


def test_pissa_trains_on_a_mesh_resumes_and_exports_for_peft(bases, tmp_path):
    """Through the CLI on 2 devices (FSDP): the split runs on the sharded kernels, training moves the
    adapter; a run stopped after step 2 resumes exactly (the frozen residual, never checkpointed, is split
    again alike); the export, with the starting factors the run kept frozen, loads in PEFT on the original
    base with jaxft's logits."""
    m, d = bases["llama"]
    run = tmp_path / "run"
    args = (f"--config.model.path={d}", "--config.method.init_lora_weights=pissa_niter_4",
            "--config.method.targets=q_proj,v_proj,down_proj", "--config.mesh.fsdp=2", "--config.data.task=causal_lm",
            "--config.train.steps=4", "--config.checkpoint.every_steps=2", "--config.train.log_every_steps=1")
    r = cli(run, *args, devices=2)
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "export" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["task_type"] == "CAUSAL_LM"
    model, params = hf.load(d, adapter=str(run / "export"))
    ours = logits(model, params)
    assert np.abs(ours - torch_logits(m)).max() > 1e-4  # trained
    np.testing.assert_allclose(torch_logits(PeftModel.from_pretrained(copy.deepcopy(m), run / "export").eval()), ours,
                               atol=1e-5)
    assert_resumes_exactly(run, tmp_path / "split", args, 2, 4, devices=2)


@pytest.mark.parametrize("value", ["pisa", "pissa_niter_0", "olora_niter_2"])
def test_unknown_init_is_one_error(bases, value):
    cfg = hf.load(bases["llama"][1])[0].cfg
    with pytest.raises(JaxftError, match=rf"method.init_lora_weights='{value}': expected '' \(PEFT's default\)"):
        build(method_cfg(name="lora", init_lora_weights=value), cfg)
