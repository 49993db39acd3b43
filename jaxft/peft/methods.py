"""The methods jaxft ships, registered by name. A method is data: which leaves train, and which
hooks the model runs; each declares itself once as a `registry.Kind` (the parameters it adds, which
of them decay, its HF PEFT type), and nothing downstream (train step, optimizer, checkpoint,
sharding, export) looks at a method's name.

Modifiers that apply to any method: `method.layers` ('0-3', '0,2,5-7') trains only those decoder
layers (and, outside the layer stack, only method-added leaves and the head), `method.trainable_pattern`
adds a regex of leaves that train too ('!regex' freezes matching leaves instead).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft import registry
from jaxft.peft.hook import Hook, acts_on_linear
from jaxft.peft.lora import LoraHook, module_path, names_match, parse_targets, target_names
from jaxft.peft.prompt import ENCODERS, INITS, PromptHook, parse_template
from jaxft.peft.ptuning_v2 import PrefixHook
from jaxft.peft.registry import Kind, register


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    trainable: tuple[str, ...]  # regexes searched in "a/b/c" parameter paths; "!regex" excludes
    hooks: tuple[Any, ...] = ()


def _full(m, cfg) -> Method:
    return Method("full", (r".",))


def _head(m, cfg) -> Method:
    if cfg.head == "causal_lm" and getattr(cfg, "tie_word_embeddings", False):
        raise JaxftError("method.name='head' on a causal LM with tied embeddings would train the embeddings too")
    pattern = family.of(cfg).head_params
    if not any(re.search(pattern, p) for p in param_shapes(cfg)):  # e.g. an LM head that is the tied embeddings
        raise JaxftError(f"method.name='head': this {cfg.model_type} model with head={cfg.head!r} has no output head "
                         f"of its own (tie_word_embeddings={getattr(cfg, 'tie_word_embeddings', None)}); choose "
                         "another method")
    return Method("head", (pattern,))


def param_shapes(model_cfg, hooks=()) -> dict:
    """{"a/b/c": shape} of a model with these hooks (traced, not run)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxft.peft.partition import flat

    model = family.build(model_cfg, hooks)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    return {k: v.shape for k, v in flat(nn.unbox(boxed)).items()}


def _bitfit(m, cfg) -> Method:
    """BitFit (Ben Zaken et al. 2022): only the bias terms train (and a new classifier head)."""
    pattern = r"(^|/)bias$"
    if not any(re.search(pattern, p) for p in param_shapes(cfg)):
        raise JaxftError(f"method.name='bitfit': this {cfg.model_type} model has no bias parameters (BitFit trains "
                         "only biases; choose a model with biases, e.g. Qwen2's q/k/v, or another method)")
    return Method("bitfit", (pattern,))


def default_lora_targets(cfg) -> str:
    """The family's default `method.targets` (LoRA's, AdaLoRA's) for this config."""
    targets = family.of(cfg).lora_targets
    return targets(cfg) if callable(targets) else targets


ALL_LINEAR = "all-linear"  # PEFT's shorthand (QLoRA's choice): every linear layer but the output head


def resolve_targets(targets, cfg, default: str) -> str:
    """A targets setting: empty -> `default`; 'all-linear' -> every Linear of the model but its output heads
    (the LM head, a classifier, BERT's pooler: what `Family.head_params` names, heads that train whole where
    the run adds them), as a regex of their paths; else itself."""
    targets = str(targets or "").strip()
    if not targets:
        return default
    if targets.lower() != ALL_LINEAR:
        return targets
    heads = re.compile(family.of(cfg).head_params)
    return "|".join(re.escape(p) for p in linear_paths(cfg) if not heads.search(p.replace(".", "/") + "/"))


def lora_targets(m, cfg) -> str:
    """`method.targets` of LoRA / AdaLoRA (`resolve_targets`; empty: the family's default)."""
    return resolve_targets(m.targets, cfg, default_lora_targets(cfg))


def _lora(m, cfg) -> Method:
    if m.rank <= 0:
        raise JaxftError(f"method.rank={m.rank}: expected a positive integer")
    targets = lora_targets(m, cfg)
    try:
        parse_targets(targets)
    except Exception as e:
        raise JaxftError(f"method.targets={targets!r}: not a module-name list or a valid regex ({e})") from None
    init = str(m.get("init_lora_weights", "") or "")
    if not re.fullmatch(r"|gaussian|pissa|pissa_niter_[1-9]\d*|olora", init):
        raise JaxftError(f"method.init_lora_weights={init!r}: expected '' (PEFT's default), 'gaussian', 'pissa', "
                         "'pissa_niter_N' (N power iterations of a randomised SVD) or 'olora'")
    hook = LoraHook(m.rank, float(m.alpha), float(m.dropout), targets, bool(m.get("rslora", False)),
                    bool(m.get("dora", False)), init)
    return Method("lora", (r"/lora_[ab]$", r"/lora_magnitude$") if hook.dora else (r"/lora_[ab]$",), (hook,))


def _virtual_tokens(m) -> int:
    if m.num_virtual_tokens <= 0:
        raise JaxftError(f"method.num_virtual_tokens={m.num_virtual_tokens}: expected a positive integer")
    return int(m.num_virtual_tokens)


def _prefix_layout(m, cfg) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) the prefix fills; a model none of whose stacks takes one (T5's token head
    runs its encoder alone, and T5 reads a prefix in its decoder) is an error."""
    fam = family.of(cfg)
    if fam.activation_blocks is not None and not any(b.takes_prefix for b in fam.activation_blocks(cfg)):
        raise JaxftError(f"method.name={m.name!r}: no attention of this {cfg.model_type} model with head={cfg.head!r} "
                         "takes a prefix: expected a method without one (lora, prompt_tuning, ia3, ...)")
    return fam.kv_layout(cfg)


def _ptuning_v2(m, cfg) -> Method:
    n = _virtual_tokens(m)
    _prefix_layout(m, cfg)
    if m.get("init_from_tokens", False) and m.get("projection", False):
        # The MLP's output is shared weights, not per-token values a real token's keys could seed.
        raise JaxftError("method.init_from_tokens=True needs method.projection=False")
    hidden = int(m.get("projection_hidden", 512))
    if m.get("projection", False) and hidden <= 0:
        raise JaxftError(f"method.projection_hidden={hidden}: expected a positive integer")
    hook = PrefixHook(
        n,
        bool(m.get("projection", False)),
        hidden,
        float(m.get("prompt_dropout", 0.0)),
        float(m.get("init_std", 1.0)),
        bool(m.get("init_from_tokens", False)),
    )
    return Method("ptuning_v2", (r"^prefix_encoder/",), (hook,))


def _prefix_tuning(m, cfg) -> Method:
    """Li & Liang (2021) as PEFT's PREFIX_TUNING with prefix_projection=True: P-Tuning v2's hook with
    the reparameterisation MLP, its embedding as wide as the keys/values (PEFT's token_dim)."""
    n = _virtual_tokens(m)
    layers, kv_heads, head_dim = _prefix_layout(m, cfg)
    hidden = int(m.get("projection_hidden", 512))
    if hidden <= 0:
        raise JaxftError(f"method.projection_hidden={hidden}: expected a positive integer")
    hook = PrefixHook(n, projection=True, projection_hidden=hidden, dropout=float(m.get("prompt_dropout", 0.0)),
                      embed_dim=kv_heads * head_dim, kind="prefix_tuning")
    return Method("prefix_tuning", (r"^prefix_encoder/",), (hook,))


def _prompt_tuning(m, cfg, tokenizer=None) -> Method:
    """Lester et al. (2021): learned input embeddings of virtual tokens in front of the input."""
    n = _virtual_tokens(m)
    init = str(m.get("prompt_init", "random"))
    if init not in INITS:
        raise JaxftError(f"method.prompt_init={init!r}: expected one of {', '.join(map(repr, INITS))}")
    text = str(m.get("prompt_init_text", ""))
    ids: tuple[int, ...] = ()
    if init == "text":
        if not text.strip():
            raise JaxftError("method.prompt_init='text' needs method.prompt_init_text (the text whose token "
                             "embeddings start the prompt)")
        if tokenizer is not None:  # as PEFT: the tokenizer's ids of the text, with its BOS
            ids = tuple(tokenizer.bos + tokenizer.encode(text))
    hook = PromptHook(n, "prompt_tuning", init=init, init_ids=ids, init_text=text, init_std=float(m.get("init_std", 1.0)))
    return Method("prompt_tuning", (r"^prompt_embeddings/",), (hook,))


def _ptuning(m, cfg) -> Method:
    """P-Tuning (Liu et al. 2021, v1): virtual tokens from a prompt encoder (MLP or LSTM), in front."""
    n = _virtual_tokens(m)
    encoder = str(m.get("encoder", "mlp")).lower()
    if encoder not in ENCODERS[1:]:
        raise JaxftError(f"method.encoder={encoder!r}: expected 'mlp' or 'lstm'")
    hidden, layers = int(m.get("encoder_hidden", 0)), int(m.get("encoder_layers", 2))
    if hidden < 0 or layers <= 0:
        raise JaxftError(f"method.encoder_hidden={hidden}, method.encoder_layers={layers}: expected >= 0 and > 0")
    template = str(m.get("template", "") or "")
    if template:
        parse_template(template, n)
    hook = PromptHook(n, "ptuning", encoder=encoder, encoder_hidden=hidden, encoder_layers=layers,
                      encoder_dropout=float(m.get("encoder_dropout", 0.0)), template=template)
    return Method("ptuning", (r"^prompt_encoder/",), (hook,))


PREFIX = r"(^|/)prefix_encoder/"
for _kind in (
    Kind("full", _full, description="every parameter trains"),
    Kind("head", _head, description="only the output head trains"),
    Kind("bitfit", _bitfit, description="only the biases train (Ben Zaken et al. 2022)"),
    Kind("lora", _lora, added=r"(^|/)lora_(a|b|a0|b0|magnitude|merged_norm)$", no_decay=r"(^|/)lora_magnitude$",
         export_reads=r"(^|/)lora_[ab]0$", peft_type="LORA",
         description="LoRA / rsLoRA / DoRA / PiSSA / OLoRA on named linears"),
    Kind("ptuning_v2", _ptuning_v2, added=PREFIX, no_decay=PREFIX, peft_type="PREFIX_TUNING",
         description="P-Tuning v2: learned key/value prefixes at every layer"),
    Kind("prefix_tuning", _prefix_tuning, added=PREFIX, no_decay=PREFIX, peft_type="PREFIX_TUNING",
         description="prefix tuning (Li & Liang) with its reparameterisation MLP"),
    Kind("prompt_tuning", _prompt_tuning, added=r"^prompt_embeddings/", no_decay=r"^prompt_embeddings/",
         peft_type="PROMPT_TUNING", description="prompt tuning (Lester et al.): virtual token embeddings in front"),
    Kind("ptuning", _ptuning, added=r"^prompt_encoder/", no_decay=r"^prompt_encoder/", peft_type="P_TUNING",
         description="P-Tuning v1: a prompt encoder's virtual tokens in front"),
):
    register(_kind)

METHODS = registry.KINDS  # name -> Kind (kept importable under its old name)


def _adapter(m, cfg) -> Method:
    from jaxft.peft import adapter

    kind, act = m.get("adapter_type", "houlsby"), m.get("adapter_activation", "relu")
    size = m.get("adapter_size", 64)
    if kind not in adapter.KINDS or act not in adapter.ACTIVATIONS or int(size) <= 0:
        raise JaxftError(f"method.adapter_type={kind!r}, method.adapter_activation={act!r}, method.adapter_size="
                         f"{size}: expected one of {', '.join(adapter.KINDS)}, one of "
                         f"{', '.join(adapter.ACTIVATIONS)}, and a positive size")
    return Method("adapter", (adapter.TRAINABLE,), (adapter.AdapterHook(int(size), kind, act),))


def _ia3(m, cfg) -> Method:
    from jaxft.peft import ia3

    fam = family.of(cfg)
    targets = resolve_targets(m.get("ia3_targets", ""), cfg, fam.ia3_targets(cfg) if callable(fam.ia3_targets)
                              else fam.ia3_targets)
    ff = m.get("feedforward_modules", "") or (fam.ia3_feedforward if not m.get("ia3_targets", "") else "")
    for key, value in (("method.ia3_targets", targets), ("method.feedforward_modules", ff)):
        try:
            parse_targets(value)
        except Exception as e:
            raise JaxftError(f"{key}={value!r}: not a module-name list or a valid regex ({e})") from None
    return Method("ia3", (ia3.TRAINABLE,), (ia3.IA3Hook(targets, ff),))


def _adalora(m, cfg, steps: int = 0) -> Method:
    from jaxft.peft import adalora

    hook = adalora.AdaLoraHook(
        int(m.get("init_r", 12)), int(m.get("target_r", 8)), float(m.alpha), float(m.dropout), lora_targets(m, cfg),
        int(m.get("tinit", 0)), int(m.get("tfinal", 0)), int(m.get("delta_t", 1)), float(m.get("beta1", 0.85)),
        float(m.get("beta2", 0.85)), float(m.get("orth_reg_weight", 0.5)), int(m.get("total_step", 0)))
    if not 0 < hook.target_r <= hook.init_r or hook.delta_t <= 0 or hook.orth_reg_weight < 0:
        raise JaxftError(f"method.init_r={hook.init_r}, method.target_r={hook.target_r}, method.delta_t={hook.delta_t},"
                         f" method.orth_reg_weight={hook.orth_reg_weight}: expected 0 < target_r <= init_r, "
                         "delta_t > 0, orth_reg_weight >= 0")
    total = hook.total_step or steps
    if total and hook.tinit >= total - hook.tfinal:
        raise JaxftError(f"method.tinit={hook.tinit}, method.tfinal={hook.tfinal}: expected tinit < "
                         f"total steps ({total}) - tfinal")
    # The schedule's length is the run's (train.steps) unless method.total_step says otherwise.
    return Method("adalora", (adalora.TRAINABLE,), (dataclasses.replace(hook, total_step=total),))


for _kind in (
    Kind("adapter", _adapter, added=r"(^|/)adapter_(attention|mlp)/", no_decay=r"(^|/)adapter_(attention|mlp)/\w+_bias$",
         peft_type="JAXFT_BOTTLENECK",
         description="bottleneck adapters (Houlsby: after attention and MLP; Pfeiffer: after the MLP)"),
    Kind("ia3", _ia3, added=r"(^|/)ia3_l$", no_decay=r"(^|/)ia3_l$", peft_type="IA3",
         description="IA3: learned scales of keys, values and the feed-forward input"),
    Kind("adalora", _adalora, added=r"(^|/)adalora_[abe]$", peft_type="ADALORA",
         description="AdaLoRA: SVD-form LoRA with an importance-based rank budget"),
):
    register(_kind)


class _Recorder(Hook):
    """Notes the path of every Linear the model calls, and changes nothing."""

    def __init__(self):
        self.paths = []

    def linear(self, module, x, y, kernel):
        self.paths.append(module_path(module))
        return y


def linear_paths(model_cfg) -> list[str]:
    """Dotted paths of this model's Linear layers, as hooks see them (traced, not run)."""
    import jax
    import jax.numpy as jnp

    recorder = _Recorder()
    model = family.build(model_cfg, (recorder,))
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    return list(dict.fromkeys(recorder.paths))


def check_hooks(method: Method, model_cfg) -> None:
    """Every hook that acts on Linear layers must act on at least one, and each name of a
    `method.targets` list must name a module: a typo would otherwise quietly train less (with none
    left, only the classifier head) and export a full model."""
    linear_hooks = [h for h in method.hooks if acts_on_linear(h)]
    if not linear_hooks:
        return
    paths = linear_paths(model_cfg)
    names = sorted({p.split(".")[-1] for p in paths})
    known = f"module names: {', '.join(names)}; full paths such as {paths[0]!r} for a regex"
    if getattr(model_cfg, "num_experts", 0):  # gate_proj / up_proj / down_proj of a dense model, asked of a mixture
        known += "; a mixture's experts are stacked weights, not modules: LoRA reaches attention and the router"
    for hook in linear_hooks:
        key = getattr(hook, "targets_key", "method.targets")
        what = f"{key}={hook.targets!r}" if hasattr(hook, "targets") else type(hook).__name__
        if not any(hook.acts_on(p) for p in paths):
            raise JaxftError(f"{what} matches no module of this model ({known})")
        listed = (target_names(hook.targets) or set()) if hasattr(hook, "targets") else set()
        unknown = sorted(n for n in listed if not any(names_match(n, p) for p in paths))
        if unknown:
            raise JaxftError(f"{what}: {', '.join(map(repr, unknown))} names no module of this model ({known})")


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'0-3' / '0,2,5-7' -> sorted layer indices; each must exist."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise JaxftError(f"method.layers={text!r}: expected layer indices and ranges such as '0-3' or '0,2,5-7'")
        out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    bad = sorted(i for i in out if i >= num_layers)
    if bad:
        raise JaxftError(f"method.layers={text!r}: layer {bad[0]} does not exist (the model has {num_layers}, 0-"
                         f"{num_layers - 1})")
    return sorted(out)


def _restrictions(method_config, model_cfg) -> tuple[str, ...]:
    """The generic modifiers as trainable patterns: `method.layers`, `method.trainable_pattern`."""
    out = []
    layers = str(method_config.get("layers", "") or "").strip()
    if layers:
        if model_cfg.scan_layers:
            raise JaxftError(f"method.layers={layers!r} needs model.scan_layers=False (scanned layers keep each "
                             "weight of every layer in one parameter, which trains or freezes as a whole)")
        keep = "|".join(str(i) for i in parse_layers(layers, model_cfg.num_layers))
        out.append(rf"!^layers_(?!(?:{keep})/)\d+/")  # other layers freeze
        # Outside the layer stack only what methods add and the head train (embeddings, final norm freeze).
        head = family.of(model_cfg).head_params
        out.append(rf"!^(?!layers_\d+/)(?!{head})(?!.*(?:{registry.added_regex().pattern}))")
    pattern = str(method_config.get("trainable_pattern", "") or "")
    if pattern:
        try:
            re.compile(pattern.removeprefix("!"))
        except re.error as e:
            raise JaxftError(f"method.trainable_pattern={pattern!r}: not a valid regex ({e})") from None
        out.append(pattern)
    return tuple(out)


def _build_one(kind: Kind, method_config, model_cfg, tokenizer, steps: int) -> Method:
    wants = inspect.signature(kind.build).parameters
    extra = {k: v for k, v in (("tokenizer", tokenizer), ("steps", steps)) if k in wants}
    return kind.build(method_config, model_cfg, **extra)


def build(method_config, model_cfg, tokenizer=None, steps: int = 0) -> Method:
    """config.method -> Method. Several methods compose: `method.name='lora+ptuning_v2'`.
    `tokenizer`: the run's (`jaxft.tokenizer.Tokenizer`), for methods that start from a text; `steps`:
    the run's length (train.steps), for methods with a schedule (AdaLoRA's rank budget)."""
    parts = [n.strip() for n in str(method_config.name).split("+")]
    known = registry.kinds()
    for n in parts:
        if n not in known:
            raise JaxftError(f"method.name={n!r}: unknown method (expected one of {', '.join(known)}, or several "
                             "joined by '+')")
    if len(set(parts)) < len(parts):
        raise JaxftError(f"method.name={method_config.name!r}: a method appears twice")
    template = str(method_config.get("template", "") or "")
    if template and "ptuning" not in parts:  # it places P-Tuning's virtual tokens; another method would drop it
        raise JaxftError(f"method.template={template!r} places P-Tuning's virtual tokens, but method.name="
                         f"{method_config.name!r} has no ptuning (expected method.name including ptuning, or no "
                         f"template)")
    adds = [known[n].added for n in parts if known[n].added]
    if len(set(adds)) < len(adds):
        raise JaxftError(f"method.name={method_config.name!r}: these methods add the same parameters "
                         "and cannot be combined")
    built = [_build_one(known[n], method_config, model_cfg, tokenizer, steps) for n in parts]
    trainable = tuple(p for m in built for p in m.trainable)
    if model_cfg.head in ("classification", "token_classification"):  # a new classifier head always trains
        trainable += (family.of(model_cfg).classifier_params,)
    trainable += _restrictions(method_config, model_cfg)
    method = Method("+".join(parts), tuple(dict.fromkeys(trainable)), tuple(h for m in built for h in m.hooks))
    check_hooks(method, model_cfg)
    return method


def check_mergeable(hooks, what: str = "export.merged=True") -> None:
    """A merged model folds one weight-changing method (LoRA, DoRA, PiSSA, IA3, AdaLoRA) into the base: two
    on one module would have to be folded in the order they act, and virtual tokens, prefixes and
    bottleneck adapters have no weights to fold into."""
    hooks = [h for h in hooks if getattr(h, "kind", "")]
    stuck = sorted({h.kind for h in hooks if not h.merges})
    if stuck:
        raise JaxftError(f"{what}: method {', '.join(map(repr, stuck))} cannot be folded into the base weights "
                         "(expected LoRA, DoRA, PiSSA / OLoRA, IA3 or AdaLoRA)")
    if len(hooks) > 1:
        raise JaxftError(f"{what}: {'+'.join(h.kind for h in hooks)} composes several methods; a merged model "
                         "folds in one (expected a single method, or the adapters alone)")


def merge_into_base(model, params):
    """(hooked model, params) -> (the model without hooks, its weights with the method folded in): PEFT's
    `merge_and_unload`. A quantized base is dequantized first: the merged weights are the ones the adapter
    was trained against."""
    from jaxft.peft.partition import base_params
    from jaxft.quant import dequantize_params

    check_mergeable(model.hooks, "merging")
    params = dequantize_params(params)
    for hook in model.hooks:  # a hook with nothing to fold in (NEFTune's noise) merges as itself
        params = hook.merge(params)
    return family.build(model.cfg, ()), base_params(params)


def of_hooks(hooks) -> Method:
    """The method a hooked model runs (e.g. one `jaxft.hf.load` built with an adapter): its hooks and
    what they add (+ a classifier head) as what trains."""
    hooks = tuple(h for h in hooks if getattr(h, "kind", ""))
    kinds = [registry.get(h.kind) for h in hooks]
    trainable = tuple(k.added for k in kinds if k is not None and k.added)
    return Method("+".join(h.kind for h in hooks), trainable, hooks)


# ---------------------------------------------------------------------------------------------
# A method's training-time extras (`Hook.aux_loss`, `init_state`, `update`), for the train step,
# which calls them for whatever hooks the model has.


def aux_loss(hooks, params):
    """The sum of the hooks' auxiliary losses on the trainable tree; None when no hook has one."""
    losses = [x for x in (h.aux_loss(params) for h in hooks) if x is not None]
    return sum(losses[1:], losses[0]) if losses else None


def init_method_state(hooks, params) -> dict:
    """{hook index (str): its state} for the hooks that keep per-step state."""
    states = {str(i): h.init_state(params) for i, h in enumerate(hooks)}
    return {k: v for k, v in states.items() if v is not None}


def update_method_state(hooks, state: dict, params, grads, step):
    """-> (new state, new trainable params) after every stateful hook's `update`."""
    new = {}
    for key in sorted(state, key=int):
        new[key], params = hooks[int(key)].update(state[key], params, grads, step)
    return new, params
