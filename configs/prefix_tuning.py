"""Prefix tuning (Li & Liang 2021) on SST-2: 16 learned key/value prefixes at every layer of the frozen
bundled jaxft-tiny, reparameterised by an MLP (PEFT's PREFIX_TUNING with prefix_projection=True), plus a
classifier head.

  python -m jaxft.train --config=configs/prefix_tuning.py
The MLP trains; the export is a HF PEFT PREFIX_TUNING adapter holding its output, the prefix itself
(what PEFT serves). P-Tuning v2 (`configs/ptuning_v2.py`) is the same hook without the MLP.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states

    # Method section.
    c.method.name = "prefix_tuning"
    c.method.num_virtual_tokens = 16
    c.method.projection_hidden = 128

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
