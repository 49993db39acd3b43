"""Predict a run's memory per device before anything runs.

  python -m jaxft.plan --config=configs/NAME.py [--config.KEY=VALUE ...] [--device_memory=80GB] [--json]
      [--devices=N] [--platform=cpu|gpu|tpu]

Reads config.json only (no weight, no data beyond the labels of a local file, no compiled step):
the parameter shapes come from `jax.eval_shape` of the model with the method's hooks, their
layout from `jaxft.sharding.param_shardings` over an abstract mesh of `--devices` (default: the
local ones), so a pod can be planned from a laptop. Per device, in bytes:

  weights      every leaf's shard: frozen ones in model.param_dtype (frozen projections under
               model.quantization as their packed int8 / NF4 leaves), trainable ones in fp32; plus,
               when the frozen base is stored narrower than the compute dtype, its converted copy
               (XLA converts it whole once per step: bf16 storage pays off with bf16 compute); and
               GRPO's reference policy, a copy of the trainable shards (its rollouts' KV cache is
               freed before the train step runs, so it is not counted)
  gradients    the trainable shards in fp32, twice with train.grad_accum > 1 (the running sum and
               one micro-batch's)
  optimizer    Adam's moments: mu in optimizer.mu_dtype (or fp32) and nu in fp32
  (critic)     PPO's separate critic (`train.ppo_critic`) adds its own: weights (stored as the policy's:
               trainable in fp32, those its `train.ppo_critic_method` freezes as the frozen base), the
               trainable ones' gradients and moments, and its activations on the policy's rows; the backward
               pass through either model holds what the other saved (0.99 of XLA's figure with a LoRA
               policy, tests/test_ppo.py)
  activations  summed over the family's stacks of blocks (`Family.activation_blocks`: Llama's layers,
               T5's encoder and decoder): L x saved + max(working, loss) + the batch's own arrays (a stack
               no gradient flows through, T5's encoder under P-Tuning v2, keeps nothing); with several
               stacks, the backward pass through one holds what it and the stacks before it saved, the
               later ones' freed: the largest of those sums and everything saved + loss. Per block, with
               its norms N, attentions (self; cross: T5's decoder, keys from the encoder, no prefix) and
               its MLP-wide tensors m (gated: gate and up, 2; GELU: its input, 1), for Llama
               (N = 2, m = 2, one self-attention), where, for the micro-batch
               rows b on one device, t = data.seq_len (+ GRPO's completion tokens; an encoder-decoder's
               decoder: data.target_len, or GRPO's completion tokens alone, the prompt being the encoder's),
               k = t + prefix tokens p (cross-attention: the encoder's t), c = the compute
               dtype's bytes, D = hidden, d = head dim and H, KV, F = heads, kv heads, MLP width
               (each divided by mesh.tensor where it divides):
    per_layer  what plain autodiff keeps of one layer for the backward pass:
               b t [c (2 D + H d + 2 KV d k/t + 2 F) + A]
               + c b t (inputs of the projections whose weights get gradients: D for q/k/v, H d for
               o, D for gate/up, F for down) + c b t r per LoRA target
               + 2 c b p KV d (the layer's prefix keys and values)
               + c x (the layer's kernels stored wider than c: the casts the backward reads again),
               with A = 4 H k + c H k + 4 (4 + 2 H) for XLA's einsum attention (fp32 scores,
               probabilities, row statistics) or c H d + 4 H for a fused kernel (its output and row
               log-sum-exps: cuDNN, splash, flash; `attention` says which the run takes; chunked
               keeps its output alone, and runs the einsum up to one block of tokens).
               The terms are what XLA kept per layer without a remat policy (read from the compiled
               step's layer loop): the norms' inputs, q, k and v, the attention's own, the MLP's gate
               and up, the projections' inputs, the kernels' casts (the norms and the MLP's activation
               recompute their insides: `jaxft.models.layers.recomputed`).
    kept       what remat none keeps of one layer (`jaxft.models.layers.keep_products`): the products
               of its matmuls and attention, and no projection input (a norm's or an activation's
               output) nor cast, which the backward pass recomputes:
               b t [c (2 D + 2 H d + 2 KV d k/t + 2 F) + A'] + c b t r per LoRA target + the prefix,
               with A' = 4 H k (XLA's fp32 scores) or 4 H (a fused kernel's log-sum-exps).
    saved      remat none: kept. full: the layer's input, c b t D (+ prefix). save_dots: its
               input and every projection's output, c b t (3 D + H d + 2 KV d + 2 F). offload:
               the input only on the device (the projections' outputs wait in host memory; on CPU,
               where host memory is the device's, as save_dots).
    working    the backward pass through one layer: per_layer x 1.0 (save_dots, offload), x 1.5 (none:
               what it recomputes beside the gradients, `RECOMPUTE_NONE`), x `Blocks.recompute` (full:
               it recomputes the layer first; Llama 1.9, GPT-2 1.0, T5 1.5); with XLA's einsum at
               least per_layer + b t (4 + c) H k (the softmax's backward holds its scores' and
               probabilities' gradients beside all the layer kept: the larger at long rows); with chunked
               + (4 + c) b H 512 (p + keys) per group of query blocks (`attention.chunk_groups`: each
               group's backward pass holds one block's scores and probabilities, the groups side by side).
               Set against XLA's own figures: on XLA:CPU (tests/test_plan.py: full, LoRA and P-Tuning
               v2 on 1 and 8 devices) the plan is 0.96-1.11 of XLA under remat none, 0.96-1.00 with
               remat full and 0.88 with save_dots; on an H200 (a 1.1B Llama in bf16) 1.05 with
               save_dots (the rows without remat were measured before remat none recomputed). Long rows
               (2,048 tokens, LoRA, full and P-Tuning v2): 0.95-0.99 with the einsum under each remat
               policy; chunked 0.81-1.10 at 2,048-4,096 tokens, 0.73-0.90 at 1,024 (two one-block groups).
    loss       causal LM: 1.05 fp32 [b x chunk, vocab] buffers of the fused loss (logits, exponentials
               and their gradient, fused; `jaxft.cross_entropy` chunks the sequence, up to 512 MiB of
               logits per chunk; measured 1.01-1.02 with a 32k vocabulary), alive before the backward
               pass starts: hence the max.
  total        weights + gradients + optimizer + max(activations, trainable): the update (clipped
               gradients, new moments) is computed after the activations are freed.

`max_batch_size` is the largest global batch (a multiple of the data shards times
train.grad_accum) whose total fits `--device_memory` (GB = 10^9, GiB = 2^30; default: what the
local accelerator reports). tests/test_plan.py holds the total to XLA's own memory analysis of the
real jitted step (argument + output + temp - alias, per device) within 15% for full, LoRA and
P-Tuning v2 on 1 and 8 devices, remat none and full; measured 0.96-1.11; GPT-2, BERT and T5 full and
LoRA on 1 device: 0.88-1.08 (remat none). T5 under P-Tuning v2 is planned 18-20% high. GRPO on T5
(tests/test_grpo_seq2seq.py; prompts of 32-128 tokens, completions of 32-128): 0.94-1.12.

Where the plan and XLA:CPU part: bf16 compute on CPU is emulated in fp32, so on CPU the plan
counts 4 bytes per activation element (`--platform` plans another backend: 2 bytes there); with
remat=full in bf16 on CPU the plan is 8-18% high. Unrolled layers (model.scan_layers=False) on
XLA:CPU: its scheduler runs the recomputation early and keeps it, so remat saves nothing there;
the plan assumes the policy works, as it does for scanned layers (the default).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from jaxft import sharding
from jaxft.errors import JaxftError, one_line_errors


@dataclasses.dataclass
class Setup:
    """What a run would build, as shapes only: no weight is read, no step compiled."""

    config: object
    cfg: object  # LlamaConfig
    method: object
    model: object
    mesh: object  # an AbstractMesh: plans for more devices than this machine has
    abstract: dict  # flat path -> ShapeDtypeStruct (the dtype it is stored in)
    trainable: dict  # flat path -> bool
    shardings: dict  # flat path -> NamedSharding
    num_prefix: int
    platform: str  # where the run goes: cpu, gpu or tpu
    sequences: int = 1  # model rows per example (DPO: 2, the chosen and the rejected answer)
    length: int = 0  # tokens per row: data.seq_len, and what a rollout adds to a decoder's (GRPO's completions)
    # an encoder-decoder's decoder rows: a rollout's completions (GRPO's max_new_tokens), else the targets
    # (seq2seq: data.target_len); 0: `length`
    target_length: int = 0
    reference: bool = False  # a copy of the starting trainable parameters is kept (GRPO's reference policy)
    answer_tokens: int = 1  # a cloze task's positions read per row (its longest label word's tokens)
    own: "Setup | None" = None  # a model the objective trains beside this one, on its rows (PPO's critic)


def head_of(config, fam) -> tuple[str, int | None, str]:
    """The task's head on a model of family `fam`, label count and task, read from the config, or from
    the data file's first rows."""
    from jaxft.data import sft, sources, tasks

    d = config.data
    task = config.model.head or d.task
    labels = int(d.synthetic_labels) or None if d.name == "synthetic" else None
    if not task and d.name == "synthetic":
        task = "classification" if labels else "causal_lm"
    if not task or task in ("classification", "token_classification") and labels is None:
        first = str(d.name).split("+")[0]
        if first not in sources.BUNDLED and not re.search(r"\.(jsonl|json|csv|tsv|parquet|conll|bio|bmes)$", first, re.I):
            raise JaxftError(f"data.name={d.name!r}: set data.task (the plan reads no hub dataset)")
        train, _, text_field, label_field = sources.resolve(d, first)
        task = tasks.choose_task(task, train, first, text_field, label_field, bool(d.label_field),  # as train.py
                                 sft.Fields(*sources.pair_fields(d, first)), fam.encoder_decoder)
        if task == "classification":
            labels = len(tasks.declared_labels(d.get("labels", "")) or tasks.label_vocab(train, label_field))
        if task == "token_classification":  # as train.py reads tagged words
            fields, declared = tasks.tagged_setup(d, first, train, text_field, label_field)
            labels = len(tasks.tag_labels([train], *fields, declared))
    if task == "reward":  # one output: the score
        labels = 1
    from jaxft.objectives import head_for

    return head_for(task, fam.heads) or task, labels, task


def setup(config, num_devices: int | None = None, platform: str | None = None) -> Setup:
    """config -> the model, method, mesh and parameter shapes/shardings a run would build."""
    from jax.sharding import AbstractMesh

    from jaxft import objectives
    from jaxft.config import validate
    from jaxft.models import family
    from jaxft.peft import build
    from jaxft.train import check_expert_axis, load_model_config, model_settings

    validate(config)
    num_devices = num_devices or jax.device_count()
    mesh = AbstractMesh(sharding.mesh_shape(config.mesh, num_devices), sharding.MESH_AXES)
    shards = sharding.batch_shards(mesh)
    batch, accum = config.train.batch_size, config.train.grad_accum
    if (batch // accum) % shards:  # as jaxft.train refuses it
        raise JaxftError(f"train.batch_size={batch} (per micro-batch {batch // accum}) must be divisible by "
                         f"the {shards} data-parallel shards of {sharding.described(mesh.shape.values())}")
    cfg, _, tokenizer = load_model_config(config)  # config.json only
    check_expert_axis(cfg, mesh)  # as jaxft.train refuses it
    head, labels, task = head_of(config, family.of(cfg))
    if head not in family.of(cfg).heads:  # e.g. T5 on synthetic tokens: its own (first) head, seq2seq_lm
        head = family.of(cfg).heads[0]
    cfg = cfg.replace(head=head, num_labels=labels or cfg.num_labels, **model_settings(config, cfg))
    method = build(config.method, cfg)
    model = family.build(cfg, method.hooks)
    abstract, trainable, shardings = stored_shapes(model, method, mesh)
    num_prefix = sum(getattr(h, "num_virtual_tokens", 0) for h in method.hooks)
    platform = platform or jax.default_backend()
    objective = objectives.for_task(task, config.train, cfg, config.method)  # DPO, reward models: 2 rows a pair
    seq_len, target = config.data.seq_len, 0
    if family.decodes(cfg):  # the prompt is the encoder's, the completion the decoder's
        target = objective.new_tokens or (int(config.data.target_len) if task == "seq2seq" else 0) or seq_len
    rows, answer = cloze_shape(config, tokenizer, head) if task == "cloze" else (1, 1)
    length = seq_len + (0 if target else objective.new_tokens)
    own = None
    if objective.own_model is not None:  # PPO's critic, on the policy's rows
        critic, critic_method = objective.own_model.model, objective.own_model.method
        own = Setup(config, critic.cfg, critic_method, critic, mesh, *stored_shapes(critic, critic_method, mesh), 0,
                    platform, objective.sequences, length=length)
    return Setup(config, cfg, method, model, mesh, abstract, trainable, shardings, num_prefix, platform,
                 objective.sequences * rows, length=length, target_length=target,
                 reference=objective.keeps_reference, answer_tokens=answer, own=own)


def stored_shapes(model, method, mesh) -> tuple[dict, dict, dict]:
    """A model's parameters as flat path -> ShapeDtypeStruct as a run stores them (trainable leaves as
    `init` makes them, frozen ones in `model.param_dtype`), -> whether it trains, -> NamedSharding."""
    from jaxft.peft.partition import is_trainable

    shapes, shardings = shapes_of(model, mesh)
    trainable = {p: is_trainable(p, method.trainable) for p in shapes}
    frozen_dtype = np.dtype(model.cfg.param_dtype) if model.cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    abstract = {p: jax.ShapeDtypeStruct(x.shape, x.dtype if trainable[p] else frozen_dtype) for p, x in shapes.items()}
    return abstract, trainable, shardings


def shapes_of(model, mesh) -> tuple[dict, dict]:
    """A model's parameters as flat path -> ShapeDtypeStruct (as `init` makes them) and -> NamedSharding."""
    import flax.linen as nn

    from jaxft.peft.partition import flat

    dummy = jax.ShapeDtypeStruct((1, 2), np.int32)
    boxed = jax.eval_shape(lambda r, x: model.init(r, x), jax.random.PRNGKey(0), dummy)["params"]
    return flat(nn.unbox(boxed)), flat(sharding.param_shardings(boxed, mesh))


def cloze_shape(config, tokenizer: str | None, head: str) -> tuple[int, int]:
    """A cloze task's (model rows per example, positions read per row), from its label words' tokens
    (`jaxft.data.tasks.cloze`); one-token words are assumed where there is no tokenizer to read them."""
    from jaxft.data import tasks
    from jaxft.tokenizer import Tokenizer

    words = str(config.data.verbalizer).split(",")
    if not tokenizer or not config.data.verbalizer or "{mask}" not in str(config.data.cloze_template):
        return 1, 1
    ids = tasks.label_words(Tokenizer(tokenizer), words, str(config.data.cloze_template))
    per_class, longest = tasks.cloze_layout(ids, head == "causal_lm")
    return len(words) if per_class else 1, longest


def per_device(shape, dtype, named_sharding) -> int:
    return math.prod(named_sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def stored(s: Setup, path: str, x) -> int:
    """One leaf's bytes on one device as the run stores it. With `model.quantization`, a frozen decoder
    projection is its packed int8 / NF4 leaves (`jaxft.quant`), split over the devices like the kernel."""
    from jaxft import quant
    from jaxft.models import family

    kind = s.config.model.get("quantization", "none")
    targets = re.compile(family.of(s.cfg).projections)
    if kind == "none" or s.trainable[path] or not targets.search(path) or len(x.shape) < 2:
        return per_device(x.shape, x.dtype, s.shardings[path])
    packed = jax.eval_shape(lambda w: quant.quantize(w, kind, batch_dims=len(x.shape) - 2),
                            jax.ShapeDtypeStruct(x.shape, np.float32))
    total = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(packed))
    return int(total * per_device(x.shape, np.int8, s.shardings[path]) / math.prod(x.shape))


# ---------------------------------------------------------------------------------------------
# The estimate.

def _block_modules(s: Setup, blocks) -> tuple[set, set]:
    """-> (projections of `blocks` whose kernel trains, those with a LoRA adapter)."""
    trained, adapted = set(), set()
    inside = re.compile(rf"^{re.escape(blocks.prefix)}(_\d+)?/")
    names = sorted((name for name, *_ in blocks.projections), key=len, reverse=True)
    for path, t in s.trainable.items():
        if not t or not inside.match(path):
            continue
        module, leaf = path.rsplit("/", 1)
        name = next((n for n in names if module == n or module.endswith("/" + n)), None)
        if leaf == "kernel" and name:
            trained.add(name)
        elif leaf in ("lora_a", "lora_b") and name:
            adapted.add(name)
    return trained, adapted


# fp32 [chunk, vocab] arrays the fused loss holds at once: XLA fuses logits, exponentials and their
# gradient into about one (measured 1.01-1.02 with a 32k vocabulary and chunks of 2,048 tokens, frozen
# or trained head; 1.16-1.29 with chunks of 512, where the fixed buffers weigh more).
LOSS_CHUNK_BUFFERS = 1.05
# Under remat none the backward pass through one layer holds its recomputed norms, activations and
# (XLA's einsum) probabilities beside the gradients: 1.24-1.89 times what plain autodiff keeps of the
# layer on XLA:CPU (Llama, GPT-2, BERT and T5, full and LoRA, from how XLA's figure grows with depth).
RECOMPUTE_NONE = 1.5
# A mixture's grouped matmuls off TPU (`grouped_matmul`): the backward pass through a layer holds about
# this many copies of the routed rows, padded to whole tiles, in and out of its two grouped matmuls, by
# remat policy: fitted on XLA:CPU over 8 to 64 experts, 2 to 4 per token (tests/test_plan.py).
TILED = {"full": 2.0, "none": 2.2, "save_dots": 2.6, "offload": 2.6}


def attention(s: Setup) -> str:
    """The attention the run takes on the planned platform (`family.attention_impl` there): a fused
    kernel (cuDNN, splash, flash) keeps no [T, T] scores; XLA's einsum does."""
    from jaxft.models import family

    d = s.config.data
    packed = bool(d.get("packing")) and d.get("task") in ("causal_lm", "sft")  # rows with segment ids
    return family.attention_impl(s.cfg, packed, backend=s.platform)


def activation_bytes(s: Setup, batch: int) -> dict:
    """Activation bytes per device for a global batch of `batch` (see the module docstring), summed over
    the family's stacks of blocks (`Family.activation_blocks`: Llama's layers, T5's encoder and decoder)."""
    from jaxft.cross_entropy import chunk_length
    from jaxft.data import tasks
    from jaxft.models import family
    from jaxft.models.attention import CHUNK, chunk_groups
    from jaxft.models.layers import grouped_tile

    cfg, config, mesh = s.cfg, s.config, s.mesh
    fam = family.of(cfg)
    if fam.activation_blocks is None:
        raise JaxftError(f"model family {fam.name!r} does not describe its activations (Family.activation_blocks): "
                         "jaxft.plan cannot plan it")
    shards = sharding.batch_shards(mesh)
    tp = mesh.shape["tensor"]
    b = max(batch // config.train.grad_accum // shards, 1) * s.sequences  # rows of one micro-batch on one device
    p = s.num_prefix
    lengths = {"input": s.length or config.data.seq_len}  # tokens per row of each stream the blocks read
    lengths["target"] = s.target_length or lengths["input"]
    # XLA:CPU emulates bf16 arithmetic in fp32: its temporaries match an fp32 run's (measured).
    c = 4 if s.platform == "cpu" else np.dtype(cfg.compute_dtype).itemsize
    split = lambda n: n // tp if n % tp == 0 else n  # noqa: E731  (axes the tensor axis divides)
    rank = next((h.rank for h in s.method.hooks if hasattr(h, "rank")), 0)
    policy = "save_dots" if cfg.remat == "offload" and s.platform == "cpu" else cfg.remat  # CPU: host is the device
    quantized = config.model.get("quantization", "none") != "none"
    stacks, saved_total, working, backward = [], 0, 0, 0
    all_blocks = fam.activation_blocks(cfg)
    inside = [re.compile(rf"^{re.escape(bl.prefix)}(_\d+)?/") for bl in all_blocks]
    head = re.compile(fam.head_params)
    # Trainable leaves outside every stack and not the head: embeddings, upstream of every stack, or,
    # with a prefix method, its prefix table, which feeds the stacks that take the prefix.
    outside = any(t and not any(r.match(path) for r in inside) and not head.search(path)
                  for path, t in s.trainable.items())
    upstream = outside and not p
    impl = attention(s)  # every stack's but T5's (which attention_impl says is xla)
    for i, blocks in enumerate(all_blocks):
        upstream |= any(t and inside[i].match(path) for path, t in s.trainable.items())
        if not (upstream or (p and outside and blocks.takes_prefix)):
            continue  # no gradient flows through this stack (T5's encoder under P-Tuning v2): forward only
        t = lengths[blocks.stream]
        d_model, d = blocks.hidden, blocks.head_dim
        heads, kv, ffn = split(blocks.heads), split(blocks.kv_heads), split(blocks.ffn)
        trained, adapted = _block_modules(s, blocks)
        # chunked keeps what a fused kernel keeps (its output), beside one block's scores per group below; up to
        # one block of tokens it runs the einsum
        fused = impl != "xla" and not (impl == "chunked" and t <= CHUNK)
        width = lambda n: split(n) if n != d_model else n  # noqa: E731  (the model width is not split)
        # What plain autodiff keeps of one block (per_layer), per token: the norms' inputs, per attention
        # q, k, v and either (XLA's einsum) fp32 scores, probabilities and row statistics or (a fused
        # kernel) its output and row log-sum-exps, the MLP-wide tensors; below, the projections' inputs
        # and the kernels' casts.
        keep = c * blocks.norms * d_model + c * blocks.mlp_tensors * ffn
        kept = keep  # what remat none keeps (`layers.keep_products`): no projection input, no cast
        prefix = scores = blockwise = 0
        for kind in blocks.attention:
            pk = p if kind == "self" and blocks.takes_prefix else 0  # a prefix joins self-attention only
            k = t + pk if kind == "self" else lengths["input"]  # keys per query (cross: the encoder's states)
            keep += c * (heads * d + 2 * kv * d * k / t)
            keep += c * heads * d + 4 * heads if fused else 4 * heads * k + c * heads * k + 4 * (4 + 2 * heads)
            kept += c * (2 * heads * d + 2 * kv * d * k / t) + (4 * heads if fused else 4 * heads * k)
            scores += 0 if fused else (4 + c) * heads * k  # the einsum's [H, T, K] scores and probabilities
            if fused and impl == "chunked":  # each group's backward pass holds one block's scores and probabilities
                # (self-attention: chunked never runs cross-attention, T5's einsum)
                blockwise += sum((4 + c) * b * heads * CHUNK * (pk + span)
                                 for _, _, span in chunk_groups(t, CHUNK, blocks.causal, blocks.window))
            prefix += c * 2 * b * pk * kv * d  # this block's prefix keys and values
        inputs = {}  # the distinct inputs that projections with weight gradients read
        for name, group, n_in, _ in blocks.projections:
            if name in trained | adapted and not group.startswith("cross_kv"):  # cross k/v read the encoder's states
                inputs[group] = width(n_in)
        keep += c * sum(inputs.values())
        keep += c * rank * len(adapted)  # LoRA's x @ A
        kept += c * rank * len(adapted)
        # Kernels stored wider than the compute dtype (fp32 masters, an fp32 frozen base) are cast once
        # in the forward pass, and the backward pass reads the casts again.
        # (A quantized frozen kernel is dequantized again inside its matmul's backward instead.)
        frozen_bytes = 0 if quantized else (4 if cfg.param_dtype == "float32" else 2)
        casts = sum(width(n_in) * width(n_out) for name, _, n_in, n_out in blocks.projections
                    if (4 if name in trained else frozen_bytes) > c)
        outputs = sum(width(n_out) for _, _, _, n_out in blocks.projections)
        tiles = 0  # bytes of a mixture's tiled grouped matmuls, held beside the layer's own in its backward pass
        if blocks.experts:  # a mixture: each token's k copies through the experts it was routed to
            module, e, top, f_e = blocks.experts
            tuned = any(t_ and inside[i].match(path) and f"/{module}/" in path for path, t_ in s.trainable.items())
            # Expert parallelism: a device holds e / ep experts and room for each token's min(k, e / ep) copies
            # (the worst case). When it gathers the tokens of the ep devices whose batch it shares, it keeps them
            # and their outputs, and runs one device's tokens at a time (`llama.Experts.dispatch`): under remat
            # none it keeps every device's copies, under the others none.
            ep = mesh.shape[sharding.EXPERT_AXIS]  # dividing e (`train.check_expert_axis`)
            gathered = ep > 1 and sharding.EXPERT_AXIS in sharding.batch_axes_dividing(mesh, b * shards)
            e, copies = e // ep, min(top, e // ep)  # routed rows per token
            kept_copies = copies * (ep if cfg.remat == "none" else 0) if gathered else copies
            # the routed copies and the down projections' inputs (the experts' weight gradients), their outputs
            # (the routing weights' gradient), the router's fp32 probabilities
            keep += c * kept_copies * (d_model + split(f_e)) * tuned + c * kept_copies * d_model + 4 * e * ep
            keep += c * 2 * d_model * ep * gathered  # the gathered tokens and their outputs
            kept += c * kept_copies * d_model  # the down projections' outputs, named as projections
            outputs += kept_copies * (2 * split(f_e) + d_model)
            # stacked weights cast to the compute dtype (or dequantized) whole, once per layer
            casts += e * 3 * d_model * split(f_e) * ((4 if tuned else frozen_bytes) > c or (quantized and not tuned))
            if s.platform != "tpu":  # `grouped_matmul`: the routed rows padded to whole tiles per expert, in and
                # out of both grouped matmuls, forward and backward (`TILED`)
                rows = b * t * copies
                tile = grouped_tile(rows, e)
                padded = (-(-rows // tile) + e) * tile
                tiles = TILED[cfg.remat] * c * padded * (2 * d_model + 3 * split(f_e))
        per_layer = keep * b * t + prefix + c * casts
        saved = {  # what each block leaves for the backward pass
            "none": kept * b * t + prefix,
            "full": c * b * t * d_model + prefix,  # its input
            "save_dots": c * b * t * (d_model + outputs) + prefix,  # its input, every projection's output
            "offload": c * b * t * d_model + prefix,  # its input; the projections' outputs wait in host memory
        }[policy]
        saved_total += blocks.count * saved
        # The backward pass through one layer holds about what plain autodiff would keep of it (their
        # gradients, or what save_dots recomputes); under remat none also what it recomputes, and under
        # full remat `Blocks.recompute` times that (the docstring).
        # The einsum's softmax backward holds its scores' and probabilities' gradients beside all the layer
        # kept: at long rows, where [H, T, K] outweighs the rest, that is the larger (measured 1.9-2.0x
        # per_layer at 2,048 tokens under remat none and save_dots). Attention's backward and a mixture's
        # grouped matmuls' run one after the other: the larger of their own counts.
        factor = {"full": blocks.recompute, "none": RECOMPUTE_NONE}.get(cfg.remat, 1.0)
        softmax = max(0, per_layer + scores * b * t - factor * per_layer) + blockwise
        layer = factor * per_layer + max(softmax, tiles)
        working = max(working, layer)
        # the backward pass reaches this stack with what it and the stacks before it saved; the later
        # stacks' (T5's decoder, when this is its encoder) are freed by then
        backward = max(backward, saved_total + layer)
        stacks.append({"prefix": blocks.prefix, "per_layer": per_layer, "saved": saved})
    if family.decodes(cfg) and stacks:
        encoded = c * b * lengths["input"] * cfg.hidden_size  # the encoder's output, read by every cross-attention
        saved_total, backward = saved_total + encoded, backward + encoded
    t = lengths["target"]  # the head reads the last stack's rows (an encoder-decoder's: the decoder's)
    loss = 0
    vocab_split = tp if cfg.vocab_size % tp == 0 else 1
    cloze = config.data.task == "cloze"
    if cloze and cfg.head == "causal_lm" and s.answer_tokens == 1:  # the label words' logits at one position
        loss = 2 * 4 * b * cfg.num_labels
    elif cloze:  # fp32 log-probabilities over the vocabulary where the words' tokens are read, and their gradient
        loss = 2 * 4 * b * s.answer_tokens * cfg.vocab_size / vocab_split
    elif cfg.head in ("causal_lm", "seq2seq_lm"):
        length = chunk_length(b, t, cfg.vocab_size)
        loss = LOSS_CHUNK_BUFFERS * 4 * b * length * cfg.vocab_size / vocab_split
    elif cfg.head == "masked_lm":  # fp32 logits at the targets only, and their gradient (not measured):
        loss = 2 * 4 * b * tasks.mlm_width(t) * cfg.vocab_size / vocab_split  # BERT's 15%
    tokens = lengths["input"] + (lengths["target"] if family.decodes(cfg) else 0)
    inputs_bytes = b * config.train.grad_accum * (tokens * 8 + 12)  # ids, mask (per stream), labels, weight
    total = max(backward, saved_total + loss) + inputs_bytes
    first = stacks[0] if stacks else {"per_layer": 0, "saved": 0}
    return {"total": int(total), "per_layer": first["per_layer"], "saved": first["saved"], "working": working,
            "loss": loss, "stacks": stacks, "saved_total": saved_total}


def parameter_bytes(s: Setup) -> tuple[int, int, int]:
    """-> (weights, trainable weights, optimizer state) per device, whatever the batch."""
    weights = trainable = mu = 0
    mu_dtype = np.dtype(jax.numpy.bfloat16) if s.config.optimizer.get("mu_dtype") == "bfloat16" else None
    for path, x in s.abstract.items():
        weights += stored(s, path, x)
        if s.trainable[path]:
            trainable += per_device(x.shape, x.dtype, s.shardings[path])
            mu += per_device(x.shape, mu_dtype or x.dtype, s.shardings[path])
    weights += trainable if s.reference else 0
    compute = np.dtype(s.cfg.compute_dtype).itemsize
    # A frozen base stored narrower than the compute dtype is converted once per step, whole (measured
    # on XLA:CPU): bf16 storage saves memory only with bf16 compute. A quantized projection is not: it is
    # dequantized inside its matmul, forward and backward.
    weights += sum(per_device(x.shape, s.cfg.compute_dtype, s.shardings[p]) for p, x in s.abstract.items()
                   if not s.trainable[p] and x.dtype.itemsize < compute and stored(s, p, x) == per_device(
                       x.shape, x.dtype, s.shardings[p]))
    return weights, trainable, mu + trainable  # Adam's two moments (nu as the parameters)


def estimate(s: Setup, batch: int | None = None) -> dict:
    """Per-device bytes of a run: weights, gradients, optimizer state, activations, total."""
    batch = batch or s.config.train.batch_size
    weights, trainable, optimizer = parameter_bytes(s)
    acts = activation_bytes(s, batch)
    activations = acts["total"]
    if s.own is not None:  # PPO's critic: its weights, gradients and moments, and its activations beside the policy's
        own_weights, own_trainable, own_optimizer = parameter_bytes(s.own)
        weights, trainable, optimizer = weights + own_weights, trainable + own_trainable, optimizer + own_optimizer
        # the backward pass through one model holds what the other saved
        theirs = activation_bytes(s.own, batch)
        activations = max(activations + theirs["saved_total"], theirs["total"] + acts["saved_total"])
    gradients = trainable * (2 if s.config.train.grad_accum > 1 else 1)  # + one micro-batch's, when accumulating
    # The update (clipped gradients, new moments) is made after the activations are freed: the step
    # needs the larger of the two, on top of the gradients.
    total = weights + gradients + optimizer + max(activations, trainable)
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(activations), "total": int(total)}


def max_batch_size(s: Setup, device_memory: int) -> int:
    """The largest global batch (a multiple of the data shards x micro-batches) whose total fits."""
    step = sharding.batch_shards(s.mesh) * s.config.train.grad_accum
    fits = lambda n: estimate(s, n * step)["total"] <= device_memory  # noqa: E731
    if not fits(1):
        return 0
    hi = 1
    while fits(hi * 2) and hi < 2**40:
        hi *= 2
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ---------------------------------------------------------------------------------------------
# Command line.

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].upper() not in UNITS:
        raise JaxftError(f"--device_memory={text!r}: expected a size such as 80GB, 16GiB or 512MB")
    return int(float(m[1]) * UNITS[m[2].upper()])


def local_device_memory() -> int | None:
    """What the first local accelerator says it can hold; None on CPU (no such figure)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        return None
    return stats.get("bytes_limit")


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def report(s: Setup, device_memory: int | None) -> dict:
    per_device = estimate(s)
    return {
        "per_device_bytes": per_device,
        "max_batch_size": max_batch_size(s, device_memory) if device_memory else None,
        "device_memory": device_memory,
        "devices": int(math.prod(s.mesh.shape.values())),
        "mesh": dict(s.mesh.shape),
        "batch_size": s.config.train.batch_size,
        "seq_len": s.length or s.config.data.seq_len,
        **({"target_len": s.target_length} if s.target_length else {}),
        "num_prefix": s.num_prefix,
        "remat": s.cfg.remat,
        "attention": attention(s),
    }


def text(s: Setup, r: dict) -> str:
    cfg, b = s.cfg, r["per_device_bytes"]
    frozen = trainable = 0
    for path, x in s.abstract.items():
        if s.trainable[path]:
            trainable += per_device(x.shape, x.dtype, s.shardings[path])
        else:
            frozen += stored(s, path, x)
    critic = ""
    if s.own is not None:
        own, own_trainable, _ = parameter_bytes(s.own)
        critic = f", the critic {human(own)} ({s.own.cfg.model_type} {s.own.cfg.num_layers}x{s.own.cfg.hidden_size}"
        critic += ")" if own == own_trainable else f", {s.own.method.name}: {human(own_trainable)} of it trainable)"
    prefix = f" (+{s.num_prefix} prefix)" if s.num_prefix else ""
    kind = s.config.model.get("quantization", "none")
    quantized = f" ({kind} projections)" if kind != "none" else ""
    lines = [
        f"plan: {s.method.name} on {cfg.model_type} {cfg.num_layers}x{cfg.hidden_size}, compute {cfg.dtype}, "
        f"frozen base {cfg.param_dtype}{quantized}, attention {r['attention']}, remat {cfg.remat} | mesh {r['mesh']} | "
        f"global batch {r['batch_size']} x "
        f"{r['seq_len']} tokens{prefix}" + (f" -> {r['target_len']} target tokens" if "target_len" in r else "")
        + f", {s.config.train.grad_accum} micro-batch(es) | {s.platform}",
        f"  {'per device':<14}{'bytes':>16}",
        f"  {'weights':<14}{human(b['weights']):>16}   (frozen {human(frozen)} stored, trainable {human(trainable)}"
        + (f", its starting copy {human(trainable)} (the reference)" if s.reference else "") + critic + ")",
        f"  {'gradients':<14}{human(b['gradients']):>16}",
        f"  {'optimizer':<14}{human(b['optimizer']):>16}",
        f"  {'activations':<14}{human(b['activations']):>16}   (remat {cfg.remat})",
        f"  {'total':<14}{human(b['total']):>16}",
    ]
    if r["device_memory"]:
        lines[-1] += f"   of {human(r['device_memory'])}"
    if r["max_batch_size"] is not None:
        lines.append(f"  {'max batch':<14}{r['max_batch_size']:>16}   (global, at seq_len {r['seq_len']})")
    return "\n".join(lines)


def main(argv):
    import json

    from absl import logging

    from jaxft.train import FLAGS

    if len(argv) > 1:
        raise JaxftError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    if FLAGS.devices is not None and FLAGS.devices <= 0:
        raise JaxftError(f"--devices={FLAGS.devices}: expected a positive integer (or no flag: the local devices)")
    s = setup(FLAGS.config, FLAGS.devices, FLAGS.platform)
    memory = parse_bytes(FLAGS.device_memory) if FLAGS.device_memory else local_device_memory()
    r = report(s, memory)  # without a memory figure (CPUs report none): the bytes, and no largest batch
    print(json.dumps(r) if FLAGS.json else text(s, r))
    if memory is None and not FLAGS.json:
        print(f"(the {jax.default_backend()} device reports no memory size: --device_memory=16GB, say, adds the "
              "largest batch that fits)")


def run():
    from absl import app, flags

    from jaxft.train import parse_flags

    flags.DEFINE_string("device_memory", None, "One device's memory, e.g. 80GB or 16GiB (default: the local one's).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.DEFINE_integer("devices", None, "Plan for this many devices (default: the local ones).")
    flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "Plan for this backend (default: the local one).")

    app.run(one_line_errors(main), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
