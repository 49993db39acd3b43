"""The classifier head alone on SST-2 (a linear probe of the frozen bundled jaxft-tiny's mean-pooled final
states): the baseline every PEFT method's figure is to be read against.

  python -m jaxft.train --config=configs/head.py
Only the 2-way head trains (512 parameters: a 256 x 2 kernel, no bias). jaxft-tiny, a Llama, has no bias terms, so BitFit
stops there with one line; `configs/bitfit.py` runs on the bundled jaxft-tiny-bert for that reason.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)

    # Method section.
    c.method.name = "head"

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
