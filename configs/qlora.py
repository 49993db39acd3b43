"""QLoRA: LoRA (rank 8, alpha 16) on all linear layers of the NF4-quantized bundled jaxft-tiny, on SST-2.

  python -m jaxft.train --config=configs/qlora.py
The frozen decoder projections are stored in NF4 with double quantization (`jaxft.quant`) and
dequantized inside each matmul; the adapters and the classifier head train in fp32. Measured
2026-11-26 on 2 shared CPU cores: SST-2 dev accuracy 0.753 in 425 s, against 0.763 (378 s) for the
same run over the fp32 base (`--config.model.quantization=none`, i.e. `configs/lora.py` with LoRA on
every projection); the decoder projections take 0.129x of their fp32 bytes (`BENCHMARKS.md`).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)
    c.model.quantization = "nf4"  # none | int8 | nf4: the frozen base only

    # Method section.
    c.method.name = "lora"
    c.method.rank = 8
    c.method.alpha = 16.0
    c.method.dropout = 0.05
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

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
