"""The named points where a method acts on the model. Each defaults to doing nothing, so a method
implements only the points it needs and the model calls every hook at every point."""

from __future__ import annotations


class Hook:
    # The registered method kind (`jaxft.peft.registry`) this hook belongs to: export and import
    # find the method's HF PEFT format through it. Each method's hook class sets it.
    kind: str = ""
    # How many virtual tokens `embeddings` puts in front of the input (soft prompts). Generation
    # computes their keys and values once and holds them in front of every layer's cache.
    virtual_tokens: int = 0

    def linear_input(self, module, x):
        """Before each `Linear`'s product: return the (possibly changed) input x (IA3 scales the
        feed-forward input). The later steps and the product see the changed input."""
        return x

    def linear_product(self, module, x, y, kernel):
        """Each `Linear`'s product y = x @ kernel, before the bias: return its replacement (DoRA's
        magnitude * (W + s BA) / ||W + s BA||_col). `kernel` is the dequantized weight on a quantized base."""
        return y

    def linear(self, module, x, y, kernel):
        """After each `Linear` (bias included): return the (possibly changed) output y = x @ kernel + b."""
        return y

    def acts_on(self, path: str) -> bool:
        """Whether this hook may change the Linear at this dotted module path (any of the three steps
        above). The model skips a Linear's output only where no hook acts (the LM head fused with the
        loss); the default is to assume any hook that overrides a step acts everywhere."""
        return acts_on_linear(self)

    def embeddings(self, model, h, attention_mask, input_ids=None):
        """After the token embeddings h [B, T, D] of `input_ids` [B, T]: return (h, attention_mask),
        possibly with virtual tokens put in front ([B, P + T, D], mask [B, P + T]) or in place of
        placeholder ids (P-Tuning's template). The model drops the first P positions again from
        per-token outputs (LM logits, token labels), so outputs keep the input's length."""
        return h, attention_mask

    def block_output(self, module, h, where: str):
        """A block's sublayer output h [B, T, D] before the residual add; `where` is "attention" or
        "mlp" (adapters insert their bottleneck here)."""
        return h

    def prefix(self, model, batch_size: int):
        """Per-layer (keys, values), each [layers, batch, tokens, kv_heads, head_dim], or None."""
        return None

    # Folding a method into the base weights (PEFT's merge_and_unload; `jaxft.peft.methods.merge_into_base`).

    merges: bool = False  # whether `merge` can fold this method in (not virtual tokens, a prefix, a bottleneck)

    def merge(self, params: dict) -> dict:
        """The parameters with this method folded into the base weights it changes, so that a model
        without the hook computes what the hooked one does; its own leaves may stay (callers drop them)."""
        raise NotImplementedError(f"method {self.kind!r} cannot be folded into the base weights")

    def initialize(self, model, params: dict, sample: dict) -> dict:
        """Once before training, with a few real examples: adjust this method's initial parameters."""
        return params

    # A method's training-time extras. The train step calls these for every hook without knowing
    # which method runs; the defaults add nothing, so most methods never see them.

    def aux_loss(self, params):
        """An auxiliary loss on the trainable tree (e.g. AdaLoRA's orthogonality penalty), added to
        the mean loss of every step; None for none."""
        return None

    def init_state(self, params):
        """Per-step state this method keeps in the train state (e.g. AdaLoRA's importance scores),
        a pytree built from the initial trainable tree; None for none. Checkpointed and resumed."""
        return None

    def update(self, state, params, grads, step):
        """After each optimizer update: (state, trainable params, mean gradients, the step just
        taken, counting from 1) -> (new state, new trainable params), e.g. AdaLoRA's rank budget
        masking singular values. Only called for hooks whose `init_state` is not None."""
        return state, params


def acts_on_linear(hook) -> bool:
    """Whether a hook overrides any of the matmul point's steps."""
    return any(getattr(type(hook), n) is not getattr(Hook, n) for n in ("linear_input", "linear_product", "linear"))
