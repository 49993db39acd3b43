"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training an instruction model.

Each training forward pass adds noise drawn uniformly from [-a, a] to every token embedding, a = alpha /
sqrt(L * d) for rows of L positions (padding included) and width d, as transformers' `neftune_noise_alpha`
(TRL's SFTTrainer, LLaMA-Factory) adds it to the input embeddings' output. Evaluation, generation and
export never see it: the noise needs the training step's "dropout" rng. It is a hook at the model's
embeddings point with no parameters of its own, not a method: it joins any method (`train.neftune_noise_alpha`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.peft.hook import Hook


@dataclasses.dataclass(frozen=True)
class NoisyEmbeddings(Hook):
    alpha: float = 5.0

    merges = True  # nothing of its own to fold into a merged model

    def merge(self, params):
        return params

    def embeddings(self, model, h, attention_mask, input_ids=None):
        if self.alpha <= 0 or not model.has_rng("dropout"):
            return h, attention_mask
        bound = self.alpha / jnp.sqrt(jnp.float32(h.shape[-2] * h.shape[-1]))
        noise = jax.random.uniform(model.make_rng("dropout"), h.shape, jnp.float32, -bound, bound)
        return (h.astype(jnp.float32) + noise).astype(h.dtype), attention_mask
