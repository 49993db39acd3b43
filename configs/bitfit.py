"""BitFit (Ben Zaken et al. 2022) on SST-2: only the bias terms train, plus a classifier head.

  python -m jaxft.train --config=configs/bitfit.py
BitFit needs a model with biases. The bundled jaxft-tiny (a Llama) has none, so this config names
Qwen2.5-0.5B (biases on q/k/v; downloaded once, online); with `--config.model.path=jaxft-tiny` the run
stops with one line saying the model has no bias parameters. Qwen2's q/k/v biases: 3 per layer.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen2.5-0.5B"
    c.model.pooling = "mean"  # the head reads the mean of the final states

    # Method section.
    c.method.name = "bitfit"

    # Data section.
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 30
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
