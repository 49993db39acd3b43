"""LoRA (rank 8 on q/v, alpha 16) on SST-2 over the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/lora.py
About 1 minute on 2 CPU cores; SST-2 dev accuracy 0.727 (2026-11-25; 0.721 on 2026-11-27's code,
BENCHMARKS.md), with the mean-pooling head. Target other layers with `--config.method.targets=q_proj,k_proj,v_proj,o_proj`
or a regex such as `--config.method.targets='.*mlp\\..*_proj'`; rsLoRA with `--config.method.rslora=True`.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "lora"
    c.method.rank = 8
    c.method.alpha = 16.0
    c.method.dropout = 0.05
    c.method.targets = "q_proj,v_proj"

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
