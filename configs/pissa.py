"""PiSSA (LoRA r=8 on q/v started from each weight's top singular part, PEFT's init_lora_weights="pissa") on
SST-2 over the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/pissa.py
The frozen q/v weights become their residuals before step 1; the export is PEFT's conversion, a plain
rank-16 `LORA` adapter on the original jaxft-tiny. SST-2 dev accuracy 0.733, eval loss 0.531 (2026-11-29,
one run; LoRA with the same settings: 0.737, 0.541; BENCHMARKS.md). `--config.method.init_lora_weights=olora`
starts from the weights' QR factors instead; `pissa_niter_16` splits large weights much faster.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "lora"
    c.method.init_lora_weights = "pissa"
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
