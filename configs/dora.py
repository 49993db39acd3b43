"""DoRA (LoRA r=8 on q/v with a learned magnitude per output column, PEFT's use_dora) on SST-2 over
the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/dora.py
Exports a HF PEFT `LORA` adapter with `use_dora`. SST-2 dev accuracy 0.723 (2026-11-26, one
run, 30,720 trainable parameters with the head; 14-22 min on 2 CPU cores shared with other jobs).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "lora"
    c.method.dora = True
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
