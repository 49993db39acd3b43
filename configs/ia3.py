"""IA3 (learned scales of keys, values and the feed-forward input; HF PEFT's targets for Llama) on
SST-2 over the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/ia3.py
Exports a HF PEFT `IA3` adapter. SST-2 dev accuracy 0.686 (2026-11-26, one
run, 4,608 trainable parameters with the head; 14-22 min on 2 CPU cores shared with other jobs).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "ia3"  # targets: k_proj, v_proj, down_proj (its input): method.ia3_targets / feedforward_modules

    # Data section.
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 30
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
