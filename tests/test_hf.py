"""Oracle tests: our Llama-family model and HF checkpoint I/O against transformers' PyTorch models.

Every reference is a tiny randomly initialised transformers model written with `save_pretrained`
to a pytest tmp_path; no hub access. Weights are re-randomised (larger std than HF's default, norm
weights away from 1, biases non-zero) so that a wrong mapping, rope or mask cannot pass.
"""

from __future__ import annotations

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxft.hf as hf  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.models.layers import rope_inv_freq  # noqa: E402

TOL = 1e-5  # max abs error / max abs reference, fp32
VOCAB = 128

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.2,  # non-uniform attention, so rope and masks matter
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so scaling changes the frequencies we use
}

GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}

# name -> (transformers config class name, config kwargs)
VARIANTS = {
    "llama2_mha": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama2_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope_gqa": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE))),
    "llama_mqa_tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_bias_gqa": (
        "Qwen2Config",
        dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen2_tied_sliding": (
        "Qwen2Config",
        dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
    # the first layer full, the second sliding (max_window_layers): each layer takes its own kind
    "qwen2_mixed_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # Qwen3: per-head RMSNorm of queries and keys (its weights randomised too), explicit head_dim, no bias
    "qwen3_qknorm_head_dim": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24)),
    "qwen3_tied_sliding_bias": (
        "Qwen3Config",
        dict(tie_word_embeddings=True, attention_bias=True, use_sliding_window=True, sliding_window=5,
             max_window_layers=0),
    ),
    "mistral_head_dim": ("MistralConfig", dict(head_dim=24, num_key_value_heads=2, sliding_window=None)),
    "mistral_sliding_mqa": ("MistralConfig", dict(head_dim=8, num_key_value_heads=1, sliding_window=6)),
    # GLM-4: rotary on half of each head over adjacent pairs, q/k/v biases, one fused gate_up_proj
    "glm_partial_rope_gqa": ("GlmConfig", dict(num_key_value_heads=2, head_dim=24, pad_token_id=0)),
    # GLM-4-0414: its norms on the attention and MLP outputs too; a quarter of each head rotated, tied
    "glm4_sandwich_tied": ("Glm4Config", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=False,
                                              pad_token_id=0,
                                              rope_parameters={"rope_type": "default", "rope_theta": 5e4,
                                                               "partial_rotary_factor": 0.25})),
    # Phi-3: one fused qkv_proj and gate_up_proj, three quarters of each head rotated (Phi-4-mini's), a window
    "phi3_fused_partial_window": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=6, pad_token_id=0,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                      "partial_rotary_factor": 0.75})),
    # Gemma: RMSNorm by 1 + weight, embeddings times sqrt(hidden), GELU-tanh gate, explicit head_dim, tied
    "gemma_gqa_head_dim": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=24, pad_token_id=0,
                                               tie_word_embeddings=True)),
    # Gemma 2: norms on the attention and MLP outputs, capped scores and logits, scores scaled by
    # query_pre_attn_scalar, every other layer (from the first) sliding
    "gemma2_softcap_alternating": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=24, pad_token_id=0,
                                                        tie_word_embeddings=True, sliding_window=6,
                                                        query_pre_attn_scalar=32, attn_logit_softcapping=3.0,
                                                        final_logit_softcapping=5.0)),
    # Gemma 3: two sliding layers (their own rotary base, unscaled) to one full (linear scaling), q/k norms
    "gemma3_local_global": ("Gemma3TextConfig", dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=24,
                                                     pad_token_id=0, tie_word_embeddings=False, sliding_window=6,
                                                     query_pre_attn_scalar=32, sliding_window_pattern=3,
                                                     rope_parameters=GEMMA3_ROPE)),
    # Mixtures of experts: each token's top 2 of 6 experts (Qwen3-MoE: their weights renormalised; Qwen2-MoE:
    # not, plus a shared expert behind a sigmoid gate; Mixtral: always renormalised, Mistral's window)
    "qwen3_moe_norm_topk": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=24, num_experts=6,
                                                   num_experts_per_tok=2, moe_intermediate_size=40,
                                                   norm_topk_prob=True)),
    "qwen2_moe_shared": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                                moe_intermediate_size=40, shared_expert_intermediate_size=56)),
    "mixtral_sliding": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                              intermediate_size=40, sliding_window=6)),
}
CAUSAL = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
          "MistralConfig": "MistralForCausalLM", "GlmConfig": "GlmForCausalLM", "Glm4Config": "Glm4ForCausalLM",
          "Phi3Config": "Phi3ForCausalLM", "GemmaConfig": "GemmaForCausalLM", "Gemma2Config": "Gemma2ForCausalLM",
          "Gemma3TextConfig": "Gemma3ForCausalLM", "Qwen3MoeConfig": "Qwen3MoeForCausalLM",
          "Qwen2MoeConfig": "Qwen2MoeForCausalLM", "MixtralConfig": "MixtralForCausalLM"}


def _config(cls_name: str, **kw):
    return getattr(transformers, cls_name)(**{**BASE, **kw})


def _randomise(model, seed: int):
    """Norm weights around 1 (not 1), biases non-zero; other weights keep the config's init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_hf(tmp_path, config, model_cls: str, seed: int = 0, sub: str = "hf", **save_kw):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    _randomise(model, seed + 1)
    d = tmp_path / sub
    model.save_pretrained(d, **save_kw)
    return model, d


def hf_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def ids(batch: int, length: int, seed: int = 0, low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, VOCAB, size=(batch, length)).astype(np.int32)


def torch_logits(model, input_ids, mask=None, position_ids=None) -> np.ndarray:
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(input_ids), dtype=torch.long), **kw).logits.float().numpy()


def our_logits(model, params, input_ids, mask=None) -> np.ndarray:
    input_ids = jnp.asarray(input_ids)
    mask = jnp.ones_like(input_ids) if mask is None else jnp.asarray(mask)
    return np.asarray(model.apply({"params": params}, input_ids, attention_mask=mask))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ours))
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# 1. logits, per variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))
    cfg = model.cfg
    assert cfg.model_type == ref_model.config.model_type
    assert cfg.head == "causal_lm"
    assert cfg.num_kv_heads == ref_model.config.num_key_value_heads
    assert cfg.dim_per_head == hf_head_dim(ref_model.config)
    assert cfg.tie_word_embeddings == bool(kw.get("tie_word_embeddings", False))
    assert ("lm_head" in params) != cfg.tie_word_embeddings

    x = ids(2, 40, seed=1)
    ref = torch_logits(ref_model, x)
    ours = our_logits(model, params, x)
    assert ours.shape == (2, 40, VOCAB)
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) <= TOL


def test_llama3_rope_scaling_changes_logits_and_matches_hf_frequencies(tmp_path):
    """The llama3 variant's test is meaningful: scaling changes the frequencies and the logits."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cls_name, kw = VARIANTS["llama3_rope_gqa"]
    config = _config(cls_name, **kw)
    ref_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ref_model, d = build_hf(tmp_path, config, CAUSAL[cls_name])
    model, params = hf.load(str(d))
    assert model.cfg.rope_theta == LLAMA3_ROPE["rope_theta"]
    ours_inv = np.asarray(rope_inv_freq(model.cfg.dim_per_head, model.cfg.rope_theta, model.cfg.rope_scaling))
    np.testing.assert_allclose(ours_inv, ref_inv.numpy(), rtol=1e-6)
    plain = np.asarray(rope_inv_freq(model.cfg.dim_per_head, model.cfg.rope_theta, None))
    assert np.max(np.abs(plain - ours_inv) / plain) > 0.5  # scaling really moves the frequencies

    x = ids(2, 40, seed=2)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL
    unscaled = model.clone(cfg=model.cfg.replace(rope_scaling=None))
    assert rel_err(our_logits(unscaled, params, x), ref) > 1e-3


@pytest.mark.parametrize("variant", ["glm_partial_rope_gqa", "glm4_sandwich_tied"])
def test_glm_rotary_layout_and_norms_matter(tmp_path, variant):
    """GLM's variant tests are meaningful: rotating the whole head, or its halves rather than adjacent
    pairs, or (GLM-4-0414) leaving out the output norms changes the logits."""
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))
    cfg = model.cfg
    factor = ref_model.config.rope_parameters["partial_rotary_factor"]
    assert cfg.rotary_dim == int(cfg.dim_per_head * factor) < cfg.dim_per_head and cfg.rope_interleaved
    assert cfg.fused_gate_up and "gate_up_proj" in params["layers"]["mlp"]
    assert cfg.sandwich_norms == (cls_name == "Glm4Config") and cfg.qkv_bias == ref_model.config.attention_bias
    x = ids(2, 32, seed=5)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL
    for change in (dict(rotary_dim=0), dict(rope_interleaved=False)):
        assert rel_err(our_logits(model.clone(cfg=cfg.replace(**change)), params, x), ref) > 1e-3, change
    if cfg.sandwich_norms:
        plain = {**params, "layers": {k: v for k, v in params["layers"].items() if not k.startswith("post_")
                                      or k == "post_attention_layernorm"}}
        assert rel_err(our_logits(model.clone(cfg=cfg.replace(sandwich_norms=False)), plain, x), ref) > 1e-3
    # QLoRA's base: the fused gate_up_proj is quantized with the other projections, and runs as its
    # dequantized weights would
    from jaxft import quant
    from jaxft.models import family
    from jaxft.peft.partition import flat

    packed = quant.quantize_params(params, "nf4", targets=family.of(cfg).projections)
    kinds = {p.split("/")[-2] for p, v in flat(packed).items() if isinstance(v, quant.Quantized)}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}, kinds
    assert rel_err(our_logits(model, packed, x), our_logits(model, quant.dequantize_params(packed), x)) <= TOL


def test_phi3_fused_projections_partial_rotary_and_window_matter(tmp_path):
    """Phi-3's variant test is meaningful: rotating the whole head, or no window, changes the logits; its
    fused qkv_proj is what LoRA targets by default and what QLoRA quantizes."""
    from jaxft import quant
    from jaxft.models import family
    from jaxft.peft import build
    from jaxft.peft.partition import flat
    from hooked_models import method_cfg

    cls_name, kw = VARIANTS["phi3_fused_partial_window"]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))
    cfg = model.cfg
    assert cfg.fused_qkv and cfg.fused_gate_up and not cfg.rope_interleaved and cfg.sliding_window == 6
    assert cfg.rotary_dim == 12 and {"qkv_proj", "o_proj"} == set(params["layers"]["self_attn"])
    x = ids(2, 24, seed=6)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL
    for change in (dict(rotary_dim=0), dict(sliding_window=None)):
        assert rel_err(our_logits(model.clone(cfg=cfg.replace(**change)), params, x), ref) > 1e-3, change
    assert [h.targets for h in build(method_cfg(name="lora"), cfg).hooks] == ["qkv_proj"]
    packed = quant.quantize_params(params, "nf4", targets=family.of(cfg).projections)
    kinds = {p.split("/")[-2] for p, v in flat(packed).items() if isinstance(v, quant.Quantized)}
    assert kinds == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, kinds


@pytest.mark.parametrize("variant", ["gemma_gqa_head_dim", "gemma2_softcap_alternating", "gemma3_local_global"])
def test_gemma_differences_matter(tmp_path, variant):
    """Gemma's variant tests are meaningful: each of its differences from Llama, left out, changes the
    logits (the 1 + weight norms, the embedding scale, the GELU gate; Gemma 2's caps, score scale and
    alternating windows; Gemma 3's local rotary base and per-layer kinds)."""
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))
    cfg = model.cfg
    assert cfg.norm_offset and cfg.embed_scale and cfg.hidden_act == "gelu_tanh"
    x = ids(2, 24, seed=11)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL
    changes = [dict(norm_offset=False), dict(embed_scale=False), dict(hidden_act="silu")]
    if variant.startswith("gemma2"):
        assert cfg.layer_types == ("sliding_attention", "full_attention") and cfg.sandwich_norms
        changes += [dict(attn_softcap=None), dict(final_softcap=None), dict(query_pre_attn_scalar=0.0),
                    dict(layer_types=None), dict(sliding_window=None)]
    if variant.startswith("gemma3"):
        assert cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention") and cfg.qk_norm
        assert cfg.rope_local_theta == 100.0 and cfg.rope_theta == 1e5 and dict(cfg.rope_scaling)["factor"] == 4.0
        changes += [dict(rope_local_theta=None), dict(rope_scaling=None), dict(layer_types=None),
                    dict(query_pre_attn_scalar=0.0)]
    for change in changes:
        assert rel_err(our_logits(model.clone(cfg=cfg.replace(**change)), params, x), ref) > 1e-3, change
    # unrolled layers take the same kinds as the scanned ones
    unrolled, p_unrolled = hf.load(str(d), scan_layers=False)
    assert rel_err(our_logits(unrolled, p_unrolled, x), ref) <= TOL


@pytest.mark.parametrize("scan", [True, False])
def test_gemma3_with_vision_reads_its_text_model(tmp_path, scan):
    """Gemma 3 4B and up ship as `gemma3` (Gemma3ForConditionalGeneration: a vision tower, the text model under
    text_config, which lists few keys): jaxft reads the text model, with transformers' logits on text; saves it
    as a text-only Gemma 3 transformers reads back; and its LoRA adapter names the modules where PEFT finds them
    in the model with vision, which PEFT loads there with jaxft's logits."""
    peft = pytest.importorskip("peft")
    from hooked_models import hooked

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, sliding_window=6, sliding_window_pattern=3,
                query_pre_attn_scalar=32, rope_parameters=GEMMA3_ROPE, initializer_range=0.2)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                       image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                       eoi_token_index=VOCAB - 2)
    ref_model, d = build_hf(tmp_path, config, "Gemma3ForConditionalGeneration")
    model, params = hf.load(str(d), scan_layers=scan)
    cfg = model.cfg
    assert cfg.model_type == "gemma3" and cfg.num_layers == 3 and cfg.rope_local_theta == 100.0 and cfg.qk_norm
    x = ids(2, 20, seed=15)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL

    out = hf.save(model, params, str(tmp_path / "saved"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(again).__name__ == "Gemma3ForCausalLM"
    assert rel_err(torch_logits(again, x), ref) <= TOL

    hooked_model, _, hooked_params = hooked(d, dict(name="lora", rank=4, alpha=8.0), scan_layers=scan)
    adapter = hf.save_adapter(hooked_model, hooked_params, str(tmp_path / "adapter"), base=str(d))
    ours = our_logits(hooked_model, hooked_params, x)
    assert rel_err(ours, ref) > 1e-3
    with_adapter = peft.PeftModel.from_pretrained(ref_model, str(adapter)).eval()
    assert rel_err(torch_logits(with_adapter, x), ours) <= TOL


@pytest.mark.parametrize("variant", ["qwen3_moe_norm_topk", "qwen2_moe_shared", "mixtral_sliding"])
def test_experts_routing_matters(tmp_path, variant):
    """The mixture variants' tests are meaningful: routing each token to one expert fewer or more, or
    leaving the top-k weights as they come (or renormalising them), or dropping Qwen2-MoE's shared expert,
    changes the logits; each expert's weights land where transformers keeps them."""
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))
    cfg = model.cfg
    assert cfg.experts_per_token == 2 and cfg.num_experts == kw.get("num_experts", kw.get("num_local_experts"))
    experts = params["layers"]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj"):
        assert experts[name].shape == (2, cfg.num_experts, 64, cfg.moe_intermediate_size)
    x = ids(2, 24, seed=12)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL
    changes = [dict(experts_per_token=1), dict(experts_per_token=3), dict(norm_topk_prob=not cfg.norm_topk_prob)]
    for change in changes:
        assert rel_err(our_logits(model.clone(cfg=cfg.replace(**change)), params, x), ref) > 1e-3, change
    if cfg.shared_expert_size:
        mlp = {k: v for k, v in params["layers"]["mlp"].items() if not k.startswith("shared_expert")}
        plain = {**params, "layers": {**params["layers"], "mlp": mlp}}
        assert rel_err(our_logits(model.clone(cfg=cfg.replace(shared_expert_size=0)), plain, x), ref) > 1e-3
    # expert 1 of layer 0 holds transformers' expert 1 (gate, then up; [in, out])
    hf_experts = ref_model.model.layers[0].mlp.experts
    gate_up = hf_experts.gate_up_proj[1].detach().numpy().T
    np.testing.assert_array_equal(np.concatenate([experts["gate_proj"][0, 1], experts["up_proj"][0, 1]], -1), gate_up)
    # QLoRA's base: the stacked experts are quantized with the projections, and run as their dequantized weights
    from jaxft import quant
    from jaxft.models import family

    packed = quant.quantize_params(params, "nf4", targets=family.of(cfg).projections)
    assert all(isinstance(packed["layers"]["mlp"]["experts"][name], quant.Quantized)
               for name in ("gate_proj", "up_proj", "down_proj"))
    assert not isinstance(packed["layers"]["mlp"]["gate"]["kernel"], quant.Quantized)  # the router stays
    assert rel_err(our_logits(model, packed, x), our_logits(model, quant.dequantize_params(packed), x)) <= TOL


@pytest.mark.parametrize("extra,message", [
    ({"mlp_only_layers": [1]}, "dense layers among the experts' are not supported"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"num_experts_per_tok": 8}, "num_experts=6, num_experts_per_tok=8"),
])
def test_unsupported_experts_are_one_line_errors(tmp_path, extra, message):
    c = {**BASE, "model_type": "qwen3_moe", "num_experts": 6, "moe_intermediate_size": 8, **extra}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(JaxftError, match=message) as e:
        hf.read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("variant,scan", [("qwen3_moe_norm_topk", True), ("mixtral_sliding", False)])
def test_router_balance_loss_matches_transformers(tmp_path, variant, scan):
    """`output_router_logits` (as LLaMA-Factory's moe_aux_loss_coef sets it): transformers' load-balancing
    loss over every layer's router and the real tokens, times `router_aux_loss_coef`, joins the training
    loss; the train step's loss and router gradients are transformers' on a padded batch."""
    import optax

    from jaxft.peft import build
    from jaxft.peft.partition import split
    from jaxft.step import TrainState, make_train_step
    from hooked_models import method_cfg

    cls_name, kw = VARIANTS[variant]
    config = _config(cls_name, **kw, output_router_logits=True, router_aux_loss_coef=0.05)
    ref_model, d = build_hf(tmp_path, config, CAUSAL[cls_name])
    model, params = hf.load(str(d), scan_layers=scan)
    assert model.cfg.router_aux_loss_coef == 0.05
    x = ids(3, 16, seed=13)
    mask = np.ones_like(x)  # right padding: transformers' loss would read a left-padded row's padding position
    mask[1, 7:] = 0
    mask[2, 11:] = 0
    out = ref_model(torch.tensor(x).long(), attention_mask=torch.tensor(mask).long(),
                    labels=torch.tensor(np.where(mask == 1, x, -100)).long())
    out.loss.backward()
    _, extra = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(mask), mutable=["losses"])
    np.testing.assert_allclose(jax.tree_util.tree_leaves(extra["losses"]), [0.05 * out.aux_loss.item()], rtol=1e-5)
    assert 0.05 * out.aux_loss.item() > 1e-2 * out.loss.item()  # a share of the loss that a test can see

    trainable, frozen = split(params, build(method_cfg(name="full"), model.cfg).trainable)
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0))
    batch = {"input_ids": x, "attention_mask": mask, "weight": np.ones(3, np.float32)}
    new, metrics = jax.jit(make_train_step(model, tx, schedule, grad_accum=1))(state, frozen, batch)
    np.testing.assert_allclose(metrics["loss"], out.loss.item(), rtol=1e-5)
    router = lambda p: np.asarray(p["layers"]["mlp"]["gate"]["kernel"][0] if scan  # noqa: E731
                                  else p["layers_0"]["mlp"]["gate"]["kernel"])
    ref_grad = ref_model.model.layers[0].mlp.gate.weight.grad.numpy().T
    np.testing.assert_allclose(router(trainable) - router(new.params), ref_grad, rtol=1e-4, atol=1e-6)
    # ... and leaves it out, saved and read back, only where transformers would
    again = hf.read_config(hf.save(model, params, str(tmp_path / "saved")))
    assert again.router_aux_loss_coef == 0.05


def test_lora_on_the_experts_is_one_line_error(tmp_path):
    """The dense models' usual `targets` (every projection) name the experts' projections, which are stacked
    weights in a mixture: an error that says so, not a run that quietly trains less."""
    from jaxft.peft import build
    from hooked_models import method_cfg

    cls_name, kw = VARIANTS["qwen3_moe_norm_topk"]
    _, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    cfg = hf.read_config(d)
    with pytest.raises(JaxftError, match="'down_proj', 'gate_proj', 'up_proj' names no module .*experts are stacked "
                                         "weights") as e:
        build(method_cfg(name="lora", targets="q_proj,v_proj,gate_proj,up_proj,down_proj"), cfg)
    assert "\n" not in str(e.value)
    assert [h.targets for h in build(method_cfg(name="lora"), cfg).hooks] == ["q_proj,v_proj"]


@pytest.mark.parametrize("rows, groups", [(100, 5), (4096, 8), (24, 64)])
def test_grouped_matmul_is_ragged_dot(rows, groups):
    """`layers.grouped_matmul` (the experts' products off TPU) computes what `jax.lax.ragged_dot` does, values
    and both gradients, with empty groups and groups of fewer rows than a tile."""
    from jaxft.models.layers import grouped_matmul

    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((groups, 16, 24)), jnp.float32)
    sizes = jnp.asarray(rng.multinomial(rows, rng.dirichlet(np.full(groups, 0.5))), jnp.int32)
    assert groups < 64 or int((sizes == 0).sum()) > 0  # 24 rows over 64 groups: most are empty
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, sizes)))  # noqa: E731
    np.testing.assert_allclose(grouped_matmul(x, w, sizes), jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)
    for ours, ref in zip(jax.grad(loss(grouped_matmul), (0, 1))(x, w), jax.grad(loss(jax.lax.ragged_dot), (0, 1))(x, w)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_fused_experts_file_reads_as_per_expert(tmp_path):
    """A file that holds each layer's experts fused, in transformers 5's in-memory layout
    (`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]), reads as the per-expert one."""
    from safetensors.numpy import load_file, save_file

    cls_name, kw = VARIANTS["qwen3_moe_norm_topk"]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    tensors = load_file(str(d / "model.safetensors"))
    for layer in range(2):
        experts = ref_model.model.layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            tensors[f"model.layers.{layer}.mlp.experts.{name}"] = getattr(experts, name).detach().numpy()
    tensors = {k: v for k, v in tensors.items() if not re.search(r"experts\.\d+\.", k)}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    model, params = hf.load(str(d))
    x = ids(2, 12, seed=14)
    assert rel_err(our_logits(model, params, x), torch_logits(ref_model, x)) <= TOL


def test_a_missing_expert_is_one_line_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    cls_name, kw = VARIANTS["mixtral_sliding"]
    _, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(JaxftError, match="layer 1 has no up_proj for expert 3 .expected 4 experts.") as e:
        hf.load(str(d))
    assert "\n" not in str(e.value)


def test_mistral_sliding_window_matters(tmp_path):
    """The sliding-window variant would fail if our model ignored the window."""
    cls_name, kw = VARIANTS["mistral_sliding_mqa"]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))
    assert model.cfg.sliding_window == 6
    x = ids(1, 24, seed=3)
    ref = torch_logits(ref_model, x)
    assert rel_err(our_logits(model, params, x), ref) <= TOL
    full = model.clone(cfg=model.cfg.replace(sliding_window=None))
    assert rel_err(our_logits(full, params, x), ref) > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. left padding


@pytest.mark.parametrize("variant", ["llama3_rope_gqa", "qwen2_bias_gqa", "qwen3_qknorm_head_dim",
                                     "glm_partial_rope_gqa", "phi3_fused_partial_window",
                                     "gemma2_softcap_alternating", "gemma3_local_global"])
def test_left_padded_batch(tmp_path, variant):
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d))

    x = ids(3, 24, seed=4)
    mask = np.ones_like(x)
    mask[1, :7] = 0
    mask[2, :15] = 0
    x = np.where(mask == 1, x, 0).astype(np.int32)
    pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    ref = torch_logits(ref_model, x, mask, pos)
    ours = our_logits(model, params, x, mask)
    real = mask == 1
    assert rel_err(ours[real], ref[real]) <= TOL

    # A padded row equals the same tokens run alone, unpadded.
    alone = our_logits(model, params, x[2:3, real[2]])
    assert rel_err(ours[2][real[2]], alone[0]) <= TOL


# ---------------------------------------------------------------------------------------------
# 3. sequence classification


@pytest.mark.parametrize("scan", [True, False])
def test_sequence_classification_right_padded(tmp_path, scan):
    pad = 0
    config = _config("LlamaConfig", num_key_value_heads=2, num_labels=3, pad_token_id=pad)
    ref_model, d = build_hf(tmp_path, config, "LlamaForSequenceClassification")
    model, params = hf.load(str(d), scan_layers=scan)
    assert model.cfg.head == "classification"
    assert model.cfg.num_labels == 3
    assert model.cfg.pad_token_id == pad
    assert "lm_head" not in params and "score" in params

    x = ids(4, 16, seed=5)  # ids >= 3: no pad token among the real ones
    lengths = [16, 11, 5, 1]
    mask = (np.arange(16)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    x = np.where(mask == 1, x, pad).astype(np.int32)
    ref = torch_logits(ref_model, x, mask)
    ours = our_logits(model, params, x, mask)
    assert ours.shape == (4, 3)
    assert rel_err(ours, ref) <= TOL


def test_sequence_classification_mean_pooling(tmp_path):
    config = _config("LlamaConfig", num_key_value_heads=2, num_labels=3, pad_token_id=0)
    ref_model, d = build_hf(tmp_path, config, "LlamaForSequenceClassification")
    model, params = hf.load(str(d), pooling="mean")
    x = ids(3, 12, seed=4)
    mask = (np.arange(12)[None, :] < np.array([[12], [7], [2]])).astype(np.int32)
    x = np.where(mask == 1, x, 0).astype(np.int32)
    with torch.no_grad():  # the mean over real tokens of transformers' final (normed) states
        h = ref_model.model(input_ids=torch.tensor(x),
                            attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
        m = torch.tensor(mask, dtype=h.dtype)[..., None]
        ref = ref_model.score((h * m).sum(1) / m.sum(1)).numpy()
    ours = our_logits(model, params, x, mask)
    assert rel_err(ours, ref) <= TOL
    assert np.abs(ours - torch_logits(ref_model, x, mask)).max() > 1e-3  # not the last token's logits

    # Saved and read back, the model still pools the mean; transformers loads the directory.
    out = hf.save(model, params, str(tmp_path / "saved"))
    assert json.loads((out / "config.json").read_text())["classifier_pooling"] == "mean"
    again, p_again = hf.load(str(out))
    assert again.cfg.pooling == "mean" and rel_err(our_logits(again, p_again, x, mask), ref) <= TOL
    transformers.AutoModelForSequenceClassification.from_pretrained(str(out))

    bad = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**bad, "classifier_pooling": "cls"}))
    with pytest.raises(JaxftError, match=r"config\.json: classifier_pooling='cls': expected one of 'last', 'mean'"):
        hf.load(str(out))


@pytest.mark.parametrize("arch, kw", [("Llama", {}), ("Qwen2", {"token_classification_bias": False})],
                         ids=["llama", "qwen2-unbiased"])
def test_token_classification(tmp_path, arch, kw):
    """transformers' *ForTokenClassification (a `score` on every position, biased unless
    token_classification_bias=False): read, the same logits at the real tokens of a padded batch, saved as a
    directory transformers reads back."""
    config = _config(f"{arch}Config", num_labels=5, pad_token_id=0, **kw)
    ref_model, d = build_hf(tmp_path, config, f"{arch}ForTokenClassification")
    model, params = hf.load(str(d))
    assert model.cfg.head == "token_classification" and ("bias" in params["score"]) == (not kw)
    x = ids(2, 12, seed=3)
    mask = np.ones_like(x)
    mask[1, 7:] = 0
    ref = torch_logits(ref_model, x, mask)
    ours = our_logits(model, params, x, mask)
    assert ours.shape == (2, 12, 5)
    real = mask == 1
    assert rel_err(ours[real], ref[real]) <= TOL
    out = hf.save(model, params, str(tmp_path / "saved"))
    reloaded, info = transformers.AutoModelForTokenClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert rel_err(torch_logits(reloaded.eval(), x, mask)[real], ref[real]) <= TOL


# ---------------------------------------------------------------------------------------------
# 4. unscanned layers


# slow: [llama2_bias] (biases through unrolled layers in [qwen2_bias_gqa]; an unscanned Llama against
# transformers in test_save_round_trip[llama_mqa_tied-False]) and [mistral_head_dim] (an explicit head_dim
# through unrolled layers in [qwen3_qknorm_head_dim]).
@pytest.mark.parametrize("variant", [pytest.param("llama2_bias", marks=pytest.mark.slow), "qwen2_bias_gqa",
                                     "qwen3_qknorm_head_dim", pytest.param("mistral_head_dim", marks=pytest.mark.slow)])
def test_scan_layers_false_matches_scanned(tmp_path, variant):
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    scanned, p_scan = hf.load(str(d))
    loop, p_loop = hf.load(str(d), scan_layers=False)
    assert scanned.cfg.scan_layers and not loop.cfg.scan_layers
    assert "layers" in p_scan and "layers_0" in p_loop and "layers_1" in p_loop and "layers" not in p_loop
    x = ids(2, 20, seed=6)
    a, b = our_logits(scanned, p_scan, x), our_logits(loop, p_loop, x)
    assert rel_err(b, a) <= TOL  # same maths; only XLA's fusion differs (observed ~1e-6)
    assert rel_err(b, torch_logits(ref_model, x)) <= TOL


# ---------------------------------------------------------------------------------------------
# 5. sharded checkpoints


def test_sharded_checkpoint(tmp_path):
    cls_name, kw = VARIANTS["qwen2_bias_gqa"]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name], max_shard_size="20KB")
    index = d / "model.safetensors.index.json"
    assert index.exists() and not (d / "model.safetensors").exists()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1
    model, params = hf.load(str(d))
    x = ids(2, 20, seed=7)
    assert rel_err(our_logits(model, params, x), torch_logits(ref_model, x)) <= TOL


# ---------------------------------------------------------------------------------------------
# 6. save round trip


@pytest.mark.parametrize(
    "variant,scan",
    [
        ("llama2_bias", True),
        ("llama3_rope_gqa", True),
        ("llama_mqa_tied", False),
        ("qwen2_bias_gqa", True),
        ("qwen2_tied_sliding", False),
        ("qwen3_qknorm_head_dim", True),
        ("qwen3_tied_sliding_bias", False),
        ("mistral_head_dim", True),
        ("mistral_sliding_mqa", True),
        ("glm_partial_rope_gqa", False),
        ("glm4_sandwich_tied", True),
        ("phi3_fused_partial_window", False),
        ("qwen2_mixed_window", True),
        ("gemma_gqa_head_dim", False),
        ("gemma2_softcap_alternating", True),
        ("gemma3_local_global", True),
        ("qwen3_moe_norm_topk", True),
        ("qwen2_moe_shared", False),
        ("mixtral_sliding", True),
    ],
)
def test_save_round_trip(tmp_path, variant, scan):
    cls_name, kw = VARIANTS[variant]
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name])
    model, params = hf.load(str(d), scan_layers=scan)
    out = hf.save(model, params, str(tmp_path / "saved"))
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True, attn_implementation="eager"
    )
    reloaded.eval()
    assert type(reloaded).__name__ == type(ref_model).__name__
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    rc, oc = reloaded.config, ref_model.config
    assert hf_head_dim(rc) == hf_head_dim(oc) and rc.num_key_value_heads == oc.num_key_value_heads
    assert rc.tie_word_embeddings == oc.tie_word_embeddings
    assert getattr(rc, "sliding_window", None) == getattr(oc, "sliding_window", None)
    assert getattr(rc, "layer_types", None) == getattr(oc, "layer_types", None)
    assert rc.rope_parameters == oc.rope_parameters

    x = ids(2, 30, seed=8)
    ref = torch_logits(ref_model, x)
    assert rel_err(torch_logits(reloaded, x), ref) <= TOL
    # ... and we read our own output back.
    again, p_again = hf.load(str(out))
    assert rel_err(our_logits(again, p_again, x), ref) <= TOL


@pytest.mark.parametrize("arch", ["Qwen2", "Qwen3", "Glm4", "Phi3", "Gemma2", "Gemma3Text"])
def test_save_round_trip_classification(tmp_path, arch):
    config = _config(f"{arch}Config", num_labels=3, pad_token_id=0)
    ref_model, d = build_hf(tmp_path, config, f"{arch}ForSequenceClassification")
    model, params = hf.load(str(d))
    out = hf.save(model, params, str(tmp_path / "saved"))
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(out), output_loading_info=True, attn_implementation="eager"
    )
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.config.num_labels == 3 and reloaded.config.pad_token_id == 0
    x = ids(2, 12, seed=9)
    mask = np.ones_like(x)
    mask[1, 8:] = 0
    x = np.where(mask == 1, x, 0).astype(np.int32)
    ref = torch_logits(ref_model, x, mask)
    assert rel_err(torch_logits(reloaded, x, mask), ref) <= TOL
    assert rel_err(our_logits(model, params, x, mask), ref) <= TOL


# ---------------------------------------------------------------------------------------------
# 7. bf16 compute


def test_bf16_compute_close_to_fp32(tmp_path):
    cls_name, kw = VARIANTS["llama3_rope_gqa"]
    # HF's default init (std 0.02): bf16 error grows with activation scale, for torch as for us.
    ref_model, d = build_hf(tmp_path, _config(cls_name, **kw, initializer_range=0.02), CAUSAL[cls_name])
    m32, p32 = hf.load(str(d))
    m16, p16 = hf.load(str(d), dtype="bfloat16")
    assert m16.cfg.compute_dtype == jnp.bfloat16 and m16.cfg.dtype == "bfloat16"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(p16))  # master weights
    x = ids(2, 24, seed=10)
    ours16 = our_logits(m16, p16, x)
    assert ours16.dtype == np.float32  # logits are returned in fp32
    ours32 = our_logits(m32, p32, x)
    ref = torch_logits(ref_model, x)
    assert rel_err(ours32, ref) <= TOL
    err = rel_err(ours16, ours32)
    assert 0 < err <= 5e-2  # > 0: bf16 compute really happened
    # No worse than transformers' own bf16 model (observed: about equal), with margin.
    torch16 = copy.deepcopy(ref_model).to(torch.bfloat16)
    assert err <= 3 * rel_err(torch_logits(torch16, x), ref)


# ---------------------------------------------------------------------------------------------
# 8. errors


def test_unsupported_model_type(tmp_path):
    d = tmp_path / "neox"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64}))
    with pytest.raises(JaxftError) as e:
        hf.load(str(d))
    msg = str(e.value)
    assert str(d / "config.json") in msg
    assert "gpt_neox" in msg


def test_missing_dir(tmp_path):
    with pytest.raises(JaxftError) as e:
        hf.load(str(tmp_path / "does-not-exist"))
    assert "does-not-exist" in str(e.value)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("max_window_layers", [0, 1, 2])
def test_qwen2_sliding_config_without_layer_types(tmp_path, max_window_layers, model_type):
    """Older Qwen2 configs carry no layer_types: read max_window_layers as transformers does (Qwen2-MoE:
    odd-numbered layers below it; Qwen3-MoE: every layer)."""
    c = {
        **BASE,
        "model_type": model_type,
        "use_sliding_window": True,
        "sliding_window": 5,
        "max_window_layers": max_window_layers,
        **({"num_experts": 4, "moe_intermediate_size": 8} if model_type.endswith("moe") else {}),
    }
    c.pop("initializer_range")
    (tmp_path / "config.json").write_text(json.dumps(c))
    config_cls = {"qwen2": "Qwen2Config", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}[model_type]
    hf_config = getattr(transformers, config_cls)(**{k: v for k, v in c.items() if k != "model_type"})
    hf_types = getattr(hf_config, "layer_types", None) or ["sliding_attention"] * BASE["num_hidden_layers"]
    expected = tuple(5 if t == "sliding_attention" else None for t in hf_types)
    cfg = hf.read_config(tmp_path)
    assert cfg.layer_windows == expected
    assert cfg.mixed_layers == (len(set(hf_types)) == 2)  # 1: the first layer full, the second sliding


def test_dir_without_config_or_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JaxftError, match="config.json"):
        hf.load(str(empty))
    config = _config("LlamaConfig")
    config.save_pretrained(empty)
    with pytest.raises(JaxftError, match="safetensors"):
        hf.load(str(empty))


# ---------------------------------------------------------------------------------------------
# 9. rope scaling types


ROPE_VARIANTS = {
    "llama_yarn": ("LlamaConfig", dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_yarn_mscale": ("Qwen2Config", dict(num_key_value_heads=2, max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 8,
        "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2})),
    "mistral_yarn_attention_factor": ("MistralConfig", dict(head_dim=16, num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 12,
        "attention_factor": 1.3, "truncate": False})),
    "llama_dynamic": ("LlamaConfig", dict(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0})),
    "llama_linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    # Phi-3.5 / Phi-4-mini: LongRoPE's short factors up to the original 16 positions, the long ones past them, on
    # three quarters of each head; the attention factor from max_position_embeddings / the original length
    "phi3_longrope_partial": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0, max_position_embeddings=64,
                                                 original_max_position_embeddings=16, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0]})),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_types_match_transformers(tmp_path, variant):
    """Each rope type against transformers, within and (dynamic) beyond max_position_embeddings; and
    the scaling really changes the logits, so the test would catch it being ignored."""
    cls_name, kw = ROPE_VARIANTS[variant]
    model, params = None, None
    for length in (12, 40):  # a fresh torch model per length: its dynamic rope keeps state between calls
        ref_model, d = build_hf(tmp_path, _config(cls_name, **kw), CAUSAL[cls_name], sub=f"hf{length}")
        model, params = hf.load(str(d))
        x = ids(2, length, seed=length)
        ref = torch_logits(ref_model, x)
        assert rel_err(our_logits(model, params, x), ref) <= TOL, length
        unscaled = model.clone(cfg=model.cfg.replace(rope_scaling=None))
        moved = rel_err(our_logits(unscaled, params, x), ref)
        if variant == "llama_dynamic" and length <= 16:
            assert moved <= TOL  # dynamic NTK leaves sequences within max_position_embeddings alone
        else:
            assert moved > 1e-3
    # Saved and read back by transformers with the same rope parameters.
    out = hf.save(model, params, str(tmp_path / "saved"))
    again = transformers.AutoConfig.from_pretrained(str(out))
    assert again.rope_parameters["rope_type"] == kw["rope_parameters"]["rope_type"]


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "long_factor and short_factor have 1 and 1 "
                                                                              "values: expected 8"),
    ({"rope_type": "longrope", "short_factor": "1", "long_factor": [2.0]}, "needs short_factor as a list of numbers"),
    ({"rope_type": "longrope2"}, "rope_type 'longrope2' is not supported"),
    ({"type": "su"}, "rope_type 'su' is not supported"),
    ({"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_type": "dynamic"}, "rope_type 'dynamic' needs factor"),
])
def test_unsupported_rope_is_one_line_error(tmp_path, rope, message):
    c = {**BASE, "model_type": "llama", "rope_scaling": rope}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(JaxftError, match=message) as e:
        hf.read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model_type,extra,message", [
    ("gemma2", {"layer_types": ["sliding_attention"]}, "layer_types .*expected 2 values"),
    ("gemma3_text", {"layer_types": ["sliding_attention", "local"]}, "each one of sliding_attention, full_attention"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "the sliding layers' rope_type 'linear' is not supported"),
    ("gemma", {"hidden_act": "relu"}, "hidden activation 'relu' is not supported for gemma .expected gelu_pytorch_tanh"),
    ("llama", {"hidden_act": "gelu"}, "hidden activation 'gelu' is not supported for llama .expected silu"),
])
def test_bad_layer_kinds_and_activations_are_one_line_errors(tmp_path, model_type, extra, message):
    c = {**BASE, "model_type": model_type, **extra}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(JaxftError, match=message) as e:
        hf.read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)
