"""Every method on every model family: a method x family matrix (issues 11 and 12).

For each cell, on a tiny random transformers model saved to a tmp dir: the method builds on the
family; three jitted train steps (`jaxft.step.make_train_step`) lower the loss; exactly the leaves the
method should train (named here independently of the method's own patterns) train, and every one of
them changes; the adapter (or the whole model, for full / head / BitFit) saves and loads back with the
same logits; and where HF PEFT defines the method, the export loads in `peft` with jaxft's logits
(within 1e-5 of the largest), and LoRA's and IA3's default targets are PEFT's for the model type. A cell
that cannot make sense raises one clear error when the method is built.
"""

from __future__ import annotations

import copy
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxft import hf  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.models import family  # noqa: E402
from jaxft.objectives import for_head, shift_labels  # noqa: E402
from jaxft.peft import build  # noqa: E402
from jaxft.peft.methods import init_method_state  # noqa: E402
from jaxft.peft.partition import added_params, flat, merge, split, unflat  # noqa: E402
from jaxft.step import TrainState, make_train_step  # noqa: E402
from hooked_models import method_cfg  # noqa: E402

V, T, B, STEPS = 96, 8, 2, 3

# family -> (transformers config class, model class, config keywords, head)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      attention_bias=True, tie_word_embeddings=False)),
    # the Llama module's Qwen3: queries and keys RMS-normed per head before rotary
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                      tie_word_embeddings=True)),
    # the Llama module's GLM-4-0414: rotary on half of each head over adjacent pairs, one fused gate_up_proj,
    # norms on the attention and MLP outputs
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                   tie_word_embeddings=False)),
    # the Llama module's Phi-3: fused qkv_proj and gate_up_proj, three quarters of each head rotated
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                    "partial_rotary_factor": 0.75})),
    # the Llama module's Gemma 2: capped scores and logits, every other layer sliding (a window the 8 tokens pass)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                         sliding_window=4, query_pre_attn_scalar=12,
                                                         attn_logit_softcapping=3.0, final_logit_softcapping=5.0)),
    # the Llama module's Gemma 3: a sliding layer at its own rotary base, then a full one; q/k norms; untied
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=12, tie_word_embeddings=False,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # the Llama module's mixtures of experts: Qwen3-MoE (top 2 of 4, renormalised, q/k norms), Mixtral (a window)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, num_labels=3)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=40, num_labels=3, pad_token_id=1)),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False)),
    # T5's token head: the encoder alone and a linear classifier per token (T5ForTokenClassification)
    "t5_token": ("T5Config", "T5ForTokenClassification",
                 dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=20, feed_forward_proj="gated-gelu", num_labels=3)),
}

LORA = dict(name="lora", rank=4, alpha=8.0)
PROMPT = dict(num_virtual_tokens=3)
METHODS = {
    "full": dict(name="full"),
    "head": dict(name="head"),
    "bitfit": dict(name="bitfit"),
    "lora": LORA,
    "dora": dict(LORA, dora=True),
    "adalora": dict(name="adalora", init_r=4, target_r=2, alpha=8.0),
    "ia3": dict(name="ia3"),
    "houlsby": dict(name="adapter", adapter_size=8, adapter_type="houlsby"),
    "pfeiffer": dict(name="adapter", adapter_size=8, adapter_type="pfeiffer", adapter_activation="gelu"),
    "prompt_tuning": dict(name="prompt_tuning", **PROMPT),
    "ptuning": dict(name="ptuning", encoder="mlp", encoder_hidden=16, **PROMPT),
    "prefix_tuning": dict(name="prefix_tuning", projection_hidden=16, **PROMPT),
    "ptuning_v2": dict(name="ptuning_v2", **PROMPT),
    "lora+ptuning_v2": dict(LORA, name="lora+ptuning_v2", **PROMPT),
    # GLM's fused MLP projection (glm4 only), stored in blocks of gate and up units (`llama.gate_up_order`):
    # each method's tensors along its outputs convert to PEFT's order and back
    "lora_mlp": dict(LORA, targets="q_proj,gate_up_proj,down_proj"),
    "dora_mlp": dict(LORA, dora=True, targets="gate_up_proj"),
    "ia3_mlp": dict(name="ia3", ia3_targets="gate_up_proj,down_proj", feedforward_modules="down_proj"),
    "adalora_mlp": dict(name="adalora", init_r=4, target_r=2, alpha=8.0, targets="gate_up_proj"),
}
FUSED_MLP = ("lora_mlp", "dora_mlp", "ia3_mlp", "adalora_mlp")
LR = {"full": 3e-3, "ia3": 1e-1, "ia3_mlp": 1e-1}  # IA3's few scales take a larger step; the rest 1e-2

# What each method trains, named independently of its patterns: leaf names, or top-level modules.
HEAD_MODULES = ("lm_head", "score", "classifier", "pooler", "classification_head")
CLASSIFIER = ("score", "classifier", "pooler", "classification_head")
OWN_LEAVES = {
    "lora": r"/lora_[ab]$", "dora": r"/lora_(a|b|magnitude)$", "adalora": r"/adalora_[abe]$", "ia3": r"/ia3_l$",
    "houlsby": r"/adapter_(attention|mlp)/", "pfeiffer": r"/adapter_mlp/", "prompt_tuning": r"^prompt_embeddings/",
    "ptuning": r"^prompt_encoder/", "prefix_tuning": r"^prefix_encoder/", "ptuning_v2": r"^prefix_encoder/",
    "lora+ptuning_v2": r"/lora_[ab]$|^prefix_encoder/", "lora_mlp": r"/lora_[ab]$",
    "dora_mlp": r"/lora_(a|b|magnitude)$", "ia3_mlp": r"/ia3_l$", "adalora_mlp": r"/adalora_[abe]$",
}
# The cells that cannot make sense, and the error each raises at build time.
REFUSED = {
    ("gpt2", "head"): "tied embeddings would train the embeddings too",
    ("t5", "bitfit"): "has no bias parameters",
    **{("t5_token", m): "no attention of this t5 model with head='token_classification' takes a prefix" for m in ("ptuning_v2", "prefix_tuning",
                                                                                  "lora+ptuning_v2")},
}
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
              "ptuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING", "ptuning_v2": "PREFIX_TUNING"}
PREFIX_KINDS = ("prefix_tuning", "ptuning_v2")


def close(ours, ref, rtol=1e-5):
    """Within rtol of the largest reference logit."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert err < rtol, err


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model, objective, params, batch):
    """One jitted call per model (eager ops would compile one by one); equal models share it."""
    logits = model.apply({"params": params}, **objective.inputs(batch))
    sums = objective.loss(logits, batch)
    return logits, sums["loss_sum"] / sums["count"]


class Base:
    """One family's tiny model: the transformers original, its directory, the batch it trains on."""

    def __init__(self, name, root):
        cfg_cls, model_cls, kw = FAMILIES[name]
        torch.manual_seed(0)
        pad = kw.get("pad_token_id", 0)
        config = getattr(transformers, cfg_cls)(vocab_size=V, **{"pad_token_id": pad, **kw})
        config._attn_implementation = "eager"
        model = getattr(transformers, model_cls)(config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # norms away from 1 and biases away from 0, so that a wrong mapping cannot pass
            for n, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        if kw.get("tie_word_embeddings") is False and hasattr(model, "lm_head"):
            # an LM head of its own (T5 v1.1 / flan-T5 checkpoints have one; a fresh transformers 5 model ties it)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g))
        self.name, self.torch, self.dir = name, model.eval(), root / name
        model.save_pretrained(self.dir)
        self.model, self.params = hf.load(self.dir)
        self.cfg = self.model.cfg
        rng = np.random.RandomState(0)
        ids = rng.randint(3, V, (B, T))
        mask = np.ones((B, T), np.int32)
        mask[1, T - 2:] = 0
        ids[1, T - 2:] = pad
        self.batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask, "weight": np.ones(B, np.float32)}
        if self.cfg.head == "classification":
            self.batch["labels"] = np.array([0, 2], np.int32)
        elif self.cfg.head == "token_classification":
            self.batch["labels"] = np.where(mask == 1, rng.randint(0, 3, (B, T)), -100).astype(np.int32)
            if name == "bert":
                self.batch["token_type_ids"] = ((np.arange(T)[None] >= 4) * mask).astype(np.int32)
        elif self.cfg.head == "seq2seq_lm":
            labels = rng.randint(3, V, (B, 6)).astype(np.int32)
            labels[0, 4:] = -100
            self.batch.update(labels=labels, decoder_input_ids=np.asarray(shift_labels(labels, 0, pad), np.int32),
                              decoder_attention_mask=(labels != -100).astype(np.int32))
        self.objective = for_head(self.cfg.head)
        self.base_logits = self.logits(self.model, self.params)

    def forward(self, model, params):
        """(logits, mean loss) on the batch."""
        logits, loss = _forward(model, self.objective, params, {k: jnp.asarray(v) for k, v in self.batch.items()})
        return np.asarray(logits), float(loss)

    def logits(self, model, params):
        return self.forward(model, params)[0]

    def real(self, logits):
        """The positions both sides define: real tokens (causal LM, token classifier), real decoder tokens
        (seq2seq)."""
        if self.cfg.head in ("causal_lm", "token_classification"):
            return logits[self.batch["attention_mask"].astype(bool)]
        if self.cfg.head == "seq2seq_lm":
            return logits[self.batch["decoder_attention_mask"].astype(bool)]
        return logits

    def torch_inputs(self):
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids",
                            "decoder_attention_mask") if k in self.batch]
        return {k: torch.tensor(self.batch[k], dtype=torch.long) for k in keys}

    def torch_logits(self, model, prefix=False):
        """`model`'s logits on the batch (a transformers model, or a PEFT one around it). PEFT 0.21's
        forward cannot run prefix tuning on transformers 5 sequence classifiers (their forward names the
        cache `cache`): there its own prompt goes in as that cache, with the prefix's columns in the mask."""
        kw = self.torch_inputs()
        with torch.no_grad():
            if prefix and self.cfg.head == "classification":
                n = model.peft_config["default"].num_virtual_tokens
                kw["attention_mask"] = torch.cat([torch.ones(B, n, dtype=torch.long), kw["attention_mask"]], 1)
                out = model.base_model(**kw, cache=model.get_prompt(B))
            else:
                out = model(**kw)
        logits = out.logits.float().numpy()
        per_token = self.cfg.head in ("causal_lm", "token_classification")
        return logits[:, -T:] if per_token else logits  # PEFT's virtual positions are not the text's


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(name):
        if name not in made:
            made[name] = Base(name, root)
        return made[name]

    return get


def hooked(base, method_kw, steps=STEPS):
    method = build(method_cfg(**method_kw), base.cfg, steps=steps)
    model = family.build(base.cfg, method.hooks)
    init = jax.jit(lambda key: added_params(nn.unbox(model.init(key, jnp.zeros((1, 4), jnp.int32))["params"])))
    return model, method, merge(base.params, init(jax.random.PRNGKey(0)))


def train(base, model, method, params, lr):
    trainable, frozen = split(params, method.trainable)
    tx = optax.adam(lr)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0), method_state=init_method_state(model.hooks, trainable))
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(lr), 1, objective=base.objective))
    batch = {k: jnp.asarray(v) for k, v in base.batch.items()}
    for _ in range(STEPS):
        state, metrics = step(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
    return trainable, state.params


def expected_trainable(base, name, params) -> set:
    paths = set(flat(params))
    top = lambda p, mods: p.split("/")[0] in mods  # noqa: E731
    classifier = {p for p in paths if top(p, CLASSIFIER)} if base.cfg.head.endswith("classification") else set()
    if name == "full":
        return paths
    if name == "head":
        return {p for p in paths if top(p, HEAD_MODULES)}
    if name == "bitfit":
        return {p for p in paths if p.endswith("/bias")} | classifier
    return {p for p in paths if re.search(OWN_LEAVES[name], p)} | classifier


def peft_default_targets(mapping: str, model_type: str) -> set:
    from peft.utils import constants

    return set(getattr(constants, f"TRANSFORMERS_MODELS_TO_{mapping}_TARGET_MODULES_MAPPING").get(model_type, ()))


def hf_modules_with(tensors: dict, leaf: str) -> set:
    """HF module names (layer index dropped) that carry a PEFT tensor ending in `leaf`."""
    out = set()
    for k in tensors:
        if k.endswith(leaf):
            out.add(re.sub(r"\.\d+\.", ".N.", k[len("base_model.model."):-len(leaf)]))
    return out


CELLS = [(f, m) for f in ("llama", "gpt2", "bert", "t5") for m in METHODS if m not in FUSED_MLP]
CELLS += [("t5_token", m) for m in ("head", "lora", "ia3", "prompt_tuning", "ptuning_v2")]
CELLS += [("roberta", m) for m in ("lora", "ia3", "adalora", "prompt_tuning", "prefix_tuning", "houlsby")]
CELLS += [("qwen3", m) for m in ("full", "lora", "dora", "ia3", "adalora", "prompt_tuning", "prefix_tuning", "ptuning_v2")]
CELLS += [("glm4", m) for m in ("full", "lora", *FUSED_MLP, "dora", "ia3", "houlsby", "prompt_tuning", "ptuning_v2")]
CELLS += [("phi3", m) for m in ("full", "lora", "dora", "ia3", "ptuning_v2")]
CELLS += [("gemma2", m) for m in ("full", "lora", "ia3", "prompt_tuning", "ptuning_v2")]
CELLS += [("gemma3", m) for m in ("full", "lora", "dora", "ia3", "houlsby", "prompt_tuning", "ptuning_v2")]
CELLS += [("qwen3_moe", m) for m in ("full", "lora", "houlsby", "ptuning_v2")]
CELLS += [("mixtral", m) for m in ("full", "lora", "ia3")]


# The default run keeps every method on llama (the main family) and, on each other family, the methods whose
# code differs per family: LoRA and IA3 (each family's own targets, checked against PEFT's; GPT-2's Conv1D
# fan_in_fan_out also for DoRA and AdaLoRA), the Houlsby adapter (both adapter sites), a prefix method
# (ptuning_v2: the family's key/value layout), prompt tuning on the encoders (T5, RoBERTa's padded positions),
# a whole-model export (head or bitfit or full), and the refused cells; on GLM-4, LoRA, DoRA, IA3 and AdaLoRA on
# its fused gate_up_proj (stored in our order, read by PEFT in its own), the prefix (its half-rotated keys) and the whole model; on Phi-3, LoRA and IA3 on its fused
# qkv_proj (their defaults there); on Gemma 2, LoRA and the prefix under its capped scores and alternating
# windows; on Gemma 3, the whole model (its 1 + weight norms), IA3 (its default, queries), prompt tuning (the
# virtual tokens join after the embedding scale, as in PEFT) and the prefix (its per-layer kinds); on Qwen3-MoE the
# whole model (every expert's weights train and export per expert) and the adapter after the experts' MLP; on
# Mixtral, LoRA and IA3 (PEFT's defaults but for the expert projection w2, which transformers 5 no longer has).
# slow: each of the other cells repeats a default cell's feature: the method itself on llama in
# test_method_on_family[llama-<method>], and the family's code path in the family's default cells above
# (pfeiffer = houlsby's MLP site; prefix_tuning = ptuning_v2 plus the family-independent projection;
# ptuning / lora+ptuning_v2 = prompt_tuning / lora + ptuning_v2; full / bitfit = the family's head or bitfit
# export; DoRA's and IA3's per-module formats on T5 and BERT also in test_unscanned_blocks_export_as_scanned;
# t5_token's whole-model export (head) in test_t5.py::test_token_classifier_matches_transformers).
DEFAULT_CELLS = {("llama", m) for m in METHODS} | {
    ("gpt2", m) for m in ("head", "bitfit", "lora", "dora", "adalora", "ia3", "houlsby", "ptuning_v2")} | {
    ("bert", m) for m in ("head", "bitfit", "lora", "ia3", "houlsby", "ptuning_v2")} | {
    ("roberta", m) for m in ("lora", "prompt_tuning")} | {
    ("t5", m) for m in ("head", "bitfit", "lora", "ia3", "houlsby", "prompt_tuning", "ptuning_v2")} | {
    ("t5_token", m) for m in ("lora", "prompt_tuning", "ptuning_v2")} | {
    ("qwen3", m) for m in ("full", "lora", "ia3", "ptuning_v2")} | {
    ("glm4", m) for m in ("full", *FUSED_MLP, "ptuning_v2")} | {("phi3", m) for m in ("lora", "ia3")} | {
    ("gemma2", m) for m in ("lora", "ptuning_v2")} | {("gemma3", m) for m in ("full", "ia3", "prompt_tuning", "ptuning_v2")} | {
    ("qwen3_moe", m) for m in ("full", "houlsby")} | {("mixtral", m) for m in ("lora", "ia3")}


@pytest.mark.parametrize("family_name,method_name", [
    c if c in DEFAULT_CELLS else pytest.param(*c, marks=pytest.mark.slow) for c in CELLS],
    ids=[f"{f}-{m}" for f, m in CELLS])
def test_method_on_family(bases, tmp_path, family_name, method_name):
    base = bases(family_name)
    kw = METHODS[method_name]
    if (family_name, method_name) in REFUSED:
        with pytest.raises(JaxftError, match=REFUSED[family_name, method_name]):
            build(method_cfg(**kw), base.cfg, steps=STEPS)
        return
    model, method, params = hooked(base, kw)
    _, before = base.forward(model, params)
    start, trained = train(base, model, method, params, LR.get(method_name, 1e-2))
    # Exactly the leaves this method trains, and every one of them moves.
    assert set(flat(start)) == expected_trainable(base, method_name, params)
    moved = {k for k, v in flat(trained).items() if np.any(np.asarray(v) != np.asarray(flat(start)[k]))}
    assert moved == set(flat(start)), sorted(set(flat(start)) - moved)
    params = merge(params, trained)
    ours, after = base.forward(model, params)
    assert after < before

    if method_name in ("full", "head", "bitfit"):  # a whole model: transformers reads it with our logits
        out = hf.save(model, params, tmp_path / "model")
        again = getattr(transformers, FAMILIES[family_name][1]).from_pretrained(out).eval()
        close(base.real(base.torch_logits(again)), base.real(ours))
        model2, params2 = hf.load(out)
        close(base.real(base.logits(model2, params2)), base.real(ours))
        return

    # The adapter saves and loads back with the same logits.
    out = hf.save_adapter(model, params, tmp_path / "adapter", base=str(base.dir))
    model2, params2 = hf.load(base.dir, adapter=str(out))
    assert [h.kind for h in model2.hooks] == [h.kind for h in method.hooks]
    close(base.real(base.logits(model2, params2)), base.real(ours))
    plain = base.real(base.torch_logits(base.torch))
    close(base.real(base.base_logits), plain)  # the base is the transformers model
    assert np.abs(base.real(ours) - plain).max() > 1e-4  # the trained adapter changes the output

    # PEFT reads each part it defines with our logits (a composition: each part alone).
    for hook in method.hooks:
        kind = "dora" if getattr(hook, "dora", False) else hook.kind
        if kind not in PEFT_TYPES:
            continue
        where = out / hook.kind if len(method.hooks) > 1 else out
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base.torch), where).eval()
        assert peft_model.peft_config["default"].peft_type == PEFT_TYPES[kind]
        alone = family.build(model.cfg, (hook,))
        mine = base.logits(alone, params) if len(method.hooks) > 1 else ours
        close(base.real(base.torch_logits(peft_model, prefix=hook.kind in PREFIX_KINDS)), base.real(mine))

    # LoRA's and IA3's default targets are PEFT's for this model type (where PEFT has defaults: not GLM's).
    if method_name in ("lora", "ia3") and peft_default_targets("LORA", base.cfg.model_type):
        from safetensors.numpy import load_file

        mapping, leaf = ("LORA", ".lora_A.weight") if method_name == "lora" else ("IA3", ".ia3_l")
        config = (peft.LoraConfig(task_type=None, r=4) if method_name == "lora" else peft.IA3Config(task_type=None))
        ours = hf_modules_with(load_file(str(out / "adapter_model.safetensors")), leaf)
        try:
            reference = peft.get_peft_model(copy.deepcopy(base.torch), config)
        except peft.utils.error.NoMatchingPeftModuleError:  # PEFT 0.21 misses its own Mixtral LoRA defaults on
            # transformers 5: our targets are the ones its table names
            assert {n.split(".")[-1] for n in ours} == peft_default_targets(mapping, base.cfg.model_type)
            return
        theirs = {re.sub(r"\.\d+\.", ".N.", n.split("base_model.model.", 1)[1].rsplit(f".{leaf.split('.')[1]}", 1)[0])
                  for n, _ in reference.named_parameters() if f".{leaf.split('.')[1]}" in n}
        assert ours == theirs
        assert theirs and {n.split(".")[-1] for n in theirs} <= {t.split(".")[-1] for t in
                                                                peft_default_targets(mapping, base.cfg.model_type)}


def test_head_needs_an_output_head_of_its_own(bases):
    """A seq2seq LM whose head is the tied embeddings has no head to train alone: one clear error."""
    cfg = bases("t5").cfg.replace(tie_word_embeddings=True)
    with pytest.raises(JaxftError, match="has no output head of its own"):
        build(method_cfg(name="head"), cfg)


@pytest.mark.parametrize("family_name", ["t5", "bert"])
def test_unscanned_blocks_export_as_scanned(bases, tmp_path, family_name):
    """The per-module formats (DoRA's magnitudes, IA3, bottleneck adapters) name each block the same
    whether the model scans its blocks or not (T5: two stacks), and load back into either."""
    base = bases(family_name)
    kw = dict(name="lora+ia3+adapter", dora=True, rank=2, alpha=4.0, adapter_size=4)
    unscanned = base.cfg.replace(scan_layers=False)
    _, params = hf.load(base.dir, scan_layers=False)
    method = build(method_cfg(**kw), unscanned)
    model = family.build(unscanned, method.hooks)
    fresh = jax.jit(lambda key: added_params(nn.unbox(model.init(key, jnp.zeros((1, 4), jnp.int32))["params"])))
    added = {k: v + 0.1 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
             for i, (k, v) in enumerate(flat(fresh(jax.random.PRNGKey(0))).items())}
    params = merge(params, unflat(added))
    hf.save_adapter(model, params, tmp_path / "unscanned")
    model2, params2 = hf.load(base.dir, adapter=str(tmp_path / "unscanned"))  # scanned
    close(base.real(base.logits(model2, params2)), base.real(base.logits(model, params)))
    hf.save_adapter(model2, params2, tmp_path / "scanned")
    from safetensors.numpy import load_file

    for part in ("lora", "ia3", "adapter"):
        a, b = (load_file(str(tmp_path / d / part / "adapter_model.safetensors")) for d in ("unscanned", "scanned"))
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), part
    ia3 = peft.PeftModel.from_pretrained(copy.deepcopy(base.torch), tmp_path / "scanned" / "ia3").eval()
    alone = family.build(model2.cfg, [h for h in model2.hooks if h.kind == "ia3"])
    close(base.real(base.torch_logits(ia3)), base.real(base.logits(alone, params2)))


# slow: [t5-lora]: its heads are left out as llama's are (the LM head; a classifier in [bert-lora]).
@pytest.mark.parametrize("family_name, method", [
    ("llama", "lora"), ("gpt2", "lora"), ("bert", "lora"), pytest.param("t5", "lora", marks=pytest.mark.slow),
    ("qwen3_moe", "lora"), ("llama", "ia3")])
def test_all_linear_targets_are_peft_s(bases, tmp_path, family_name, method):
    """`all-linear`, PEFT's shorthand (LoRA's `method.targets`, IA3's `method.ia3_targets`): every linear layer
    but the output head, the modules PEFT resolves it to (GPT-2's Conv1D, T5's, a mixture's attention and
    router), but for BERT's pooler, which a classification run here trains whole as part of its new head, and a
    mixture's experts, stacked weights that LoRA here does not reach (PEFT 0.21 wraps transformers 5's fused
    experts)."""
    from safetensors.numpy import load_file

    base = bases(family_name)
    kw = dict(LORA, targets="all-linear") if method == "lora" else dict(name="ia3", ia3_targets="all-linear")
    model, _, params = hooked(base, kw)
    out = hf.save_adapter(model, params, tmp_path / "adapter", base=str(base.dir))
    leaf = ".lora_A.weight" if method == "lora" else ".ia3_l"
    ours = hf_modules_with(load_file(str(out / "adapter_model.safetensors")), leaf)
    task = "SEQ_CLS" if base.cfg.head == "classification" else None
    config = (peft.LoraConfig(task_type=task, r=4, target_modules="all-linear") if method == "lora" else
              peft.IA3Config(task_type=task, target_modules="all-linear", feedforward_modules=[]))
    reference = peft.get_peft_model(copy.deepcopy(base.torch), config)
    tag = ".lora_A" if method == "lora" else ".ia3_l"
    theirs = {re.sub(r"\.\d+\.", ".N.", n.split("base_model.model.", 1)[1].rsplit(tag, 1)[0])
              for n, _ in reference.named_parameters() if tag + "." in n}
    left_out = {"bert": {"bert.pooler.dense"},
                "qwen3_moe": {"model.layers.N.mlp.experts", "model.layers.N.mlp.experts.base_layer"}}
    assert ours == theirs - left_out.get(family_name, set())
    assert left_out.get(family_name, set()) <= theirs
    assert len(ours) >= 4
