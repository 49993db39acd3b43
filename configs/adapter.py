"""Houlsby bottleneck adapters (size 16, after attention and feed-forward) on SST-2 over the frozen
bundled jaxft-tiny, plus a classifier head (`--config.method.adapter_type=pfeiffer`: after the
feed-forward only).

  python -m jaxft.train --config=configs/adapter.py
HF PEFT has no such adapters: the export is jaxft's own format (docs/adapter_format.md), which
`jaxft.hf.load(base, adapter=dir)` reads back. SST-2 dev accuracy 0.721 (2026-11-26, one
run, 68,224 trainable parameters with the head; 14-22 min on 2 CPU cores shared with other jobs).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "adapter"
    c.method.adapter_type = "houlsby"
    c.method.adapter_size = 16

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
