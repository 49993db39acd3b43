"""AdaLoRA (SVD-form LoRA on q/v, rank budget 12 -> 8 per module between steps 60 and 480, orthogonal
regularisation 0.5) on SST-2 over the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/adalora.py
Exports a HF PEFT `ADALORA` adapter with its rank pattern. SST-2 dev accuracy 0.670 (2026-11-26, one
run, 43,616 trainable parameters with the head; 14-22 min on 2 CPU cores shared with other jobs).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "adalora"
    c.method.init_r = 12
    c.method.target_r = 8
    c.method.alpha = 16.0
    c.method.targets = "q_proj,v_proj"
    c.method.tinit = 60
    c.method.tfinal = 120
    c.method.delta_t = 10

    # Data section.
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 30
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
