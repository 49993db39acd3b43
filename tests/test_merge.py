"""A method folded into the base weights (PEFT's `merge_and_unload`): `jaxft.peft.methods.merge_into_base`
and `export.merged=True`, against PEFT's own merge."""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hooked_models import hooked, method_cfg
from peft import PeftModel
from test_train import cli

from jaxft import hf, quant
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft import build
from jaxft.peft.methods import check_mergeable, merge_into_base
from jaxft.peft.partition import added_params, base_params, merge

V = 96
IDS = np.random.RandomState(0).randint(3, V, (2, 8))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama with biased q/k/v (IA3's scaled outputs take their bias along), saved."""
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("llama")
    m.save_pretrained(d)
    return m, d


def torch_logits(m):
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.numpy()


# slow: [dora]: DoRA's fold is `lora.merge`, checked against the hooked model in
# test_peft_methods.py::test_lora_merge_unmerge[True]; merge_into_base's path in [lora].
@pytest.mark.parametrize("kw", [dict(name="lora", rank=4, alpha=8.0),
                                pytest.param(dict(name="lora", rank=4, alpha=8.0, dora=True), marks=pytest.mark.slow),
                                dict(name="ia3"), dict(name="adalora", init_r=4, target_r=2, alpha=8.0)],
                         ids=["lora", "dora", "ia3", "adalora"])
def test_merged_equals_peft_merge_and_unload(llama, tmp_path, kw):
    """The merged plain model computes what the hooked one does, and what PEFT's merge_and_unload of the
    exported adapter computes (IA3: the feed-forward's rows and the k/v columns with their biases)."""
    m, d = llama
    model, method, params = hooked(d, kw)
    ours = np.asarray(model.apply({"params": params}, IDS))
    plain, merged = merge_into_base(model, params)
    assert plain.hooks == () and not any("lora" in k or "ia3" in k or "adalora" in k
                                         for k in jax.tree_util.tree_leaves_with_path(merged) for k in [str(k[0])])
    np.testing.assert_allclose(np.asarray(plain.apply({"params": merged}, IDS)), ours, atol=2e-5)
    out = hf.save_adapter(model, params, tmp_path / "adapter", base=str(d))
    theirs = PeftModel.from_pretrained(copy.deepcopy(m), out).merge_and_unload().eval()
    assert not any("lora" in n or "ia3" in n for n, _ in theirs.named_parameters())
    np.testing.assert_allclose(torch_logits(theirs), ours, atol=2e-5)
    assert np.abs(ours - torch_logits(m)).max() > 1e-3  # the method mattered


def test_unmergeable_methods_are_one_error(llama):
    m, d = llama
    cfg = hf.load(d)[0].cfg
    for kw, message in [(dict(name="ptuning_v2", num_virtual_tokens=2), "method 'ptuning_v2' cannot be folded"),
                        (dict(name="adapter", adapter_size=4), "method 'adapter' cannot be folded"),
                        (dict(name="lora+ia3"), r"lora\+ia3 composes several methods")]:
        with pytest.raises(JaxftError, match=message):
            check_mergeable(build(method_cfg(**kw), cfg).hooks)


def test_merged_export_of_a_qlora_run(llama, tmp_path):
    """`export.merged=True` after a QLoRA run (PiSSA's split, NF4 residual): `<export>/merged` is a model
    transformers loads whose every weight is the trained model's, rebuilt here on its own: the base split as
    PiSSA splits it, stored in NF4 and dequantized, plus s BA of the trained factors (the first r of the
    exported adapter's 2r); the same run with a prefix method is refused before anything is written."""
    from safetensors.numpy import load_file

    m, d = llama
    run = tmp_path / "run"
    r = cli(run, f"--config.model.path={d}", "--config.data.task=causal_lm", "--config.model.quantization=nf4",
            "--config.method.init_lora_weights=pissa", "--config.method.alpha=16", "--config.export.merged=True",
            "--config.train.steps=4")
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "merged").eval()
    assert np.isfinite(torch_logits(merged)).all()
    config = json.loads((run / "export" / "adapter_config.json").read_text())
    adapter = load_file(str(run / "export" / "adapter_model.safetensors"))

    base, params = hf.load(d)
    method = build(method_cfg(name="lora", rank=4, alpha=16.0, init_lora_weights="pissa"), base.cfg)
    model = family.build(base.cfg, method.hooks)
    params = merge(params, added_params(nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
                                                 ["params"])))
    split = method.hooks[0].initialize(model, params, None)
    stored = quant.dequantize_params(quant.quantize_params(base_params(split), "nf4",
                                                           targets=family.of(base.cfg).projections))
    want = hf.params_to_hf(stored, base.cfg)
    scale, r4 = config["lora_alpha"] / config["r"], config["r"] // 2
    for key, a in adapter.items():
        if key.endswith("lora_A.weight"):
            name = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
            b = adapter[key.replace("lora_A", "lora_B")]
            want[name] = want[name] + scale * b[:, :r4] @ a[:r4]  # the trained factors; [r:] are the start
    got = load_file(str(run / "export" / "merged" / "model.safetensors"))
    assert set(got) >= set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    assert not np.allclose(got["model.layers.0.self_attn.q_proj.weight"],
                           m.model.layers[0].self_attn.q_proj.weight.detach().numpy(), atol=1e-3)

    for bad, message in [("--config.method.name=ptuning_v2", "export.merged=True: method 'ptuning_v2' cannot be folded"),
                         ("--config.export.dtype=int8", "export.dtype='int8': expected one of 'float32', 'bfloat16'")]:
        r = cli(tmp_path / "refused", f"--config.model.path={d}", "--config.data.task=causal_lm", bad,
                "--config.export.merged=True")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "refused").exists()


def test_merge_cli_folds_a_peft_adapter(llama, tmp_path):
    """`python -m jaxft.merge` on an adapter PEFT saved: transformers reads the merged directory with the
    logits of PEFT's merge_and_unload; a prompt adapter, and the base's own directory as --out, are one error."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from test_train import python_m

    m, d = llama
    torch.manual_seed(4)
    lora = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    lora.save_pretrained(tmp_path / "lora")
    r = python_m("jaxft.merge", f"--model={d}", f"--adapter={tmp_path / 'lora'}", f"--out={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(str(tmp_path / "out"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = torch_logits(PeftModel.from_pretrained(copy.deepcopy(m), tmp_path / "lora").merge_and_unload().eval())
    np.testing.assert_allclose(torch_logits(merged), want, atol=2e-5)
    assert np.abs(want - torch_logits(m)).max() > 1e-3

    # --dtype=bfloat16: half the bytes, read by transformers as bf16, the same model up to the rounding
    r = python_m("jaxft.merge", f"--model={d}", f"--adapter={tmp_path / 'lora'}", f"--out={tmp_path / 'bf16'}",
                 "--dtype=bfloat16")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    got = torch_logits(half.float())
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max() and not np.array_equal(got, want)

    get_peft_model(copy.deepcopy(m), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(
        tmp_path / "prompt")
    for args, message in [((f"--adapter={tmp_path / 'prompt'}", f"--out={tmp_path / 'p'}"),
                           "method 'prompt_tuning' cannot be folded into the base weights"),
                          ((f"--adapter={tmp_path / 'lora'}", f"--out={d}"), "is the base model's own directory")]:
        r = python_m("jaxft.merge", f"--model={d}", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_whole_model_export_in_half_precision(tmp_path):
    """`export.dtype=float16` on a run that trains every weight: the export's weights and config in float16,
    which jaxft reads back."""
    from safetensors import safe_open

    r = cli(tmp_path / "run", "--config.method.name=full", "--config.train.steps=2", "--config.export.dtype=float16")
    assert r.returncode == 0, r.stderr
    export = tmp_path / "run" / "export"
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "float16"
    with safe_open(str(export / "model.safetensors"), "np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float16)}
    model, params = hf.load(export)
    logits = np.asarray(model.apply({"params": params}, IDS % 128))
    assert np.isfinite(logits).all() and logits.shape == (2, 8, 128)
