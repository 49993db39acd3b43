"""P-Tuning v2 on SST-2: deep prompts on the frozen bundled jaxft-tiny, plus a classifier head.

The main job (the README's first command):
  python -m jaxft.train --config=configs/ptuning_v2.py
Reaches >= 0.80 dev accuracy on the GLUE SST-2 dev set in under 10 minutes on 2 CPU cores; only
the prefixes (16 tokens x 4 layers x keys and values) and the 2-way head train.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"

    # Method section: learned key/value prefixes at every layer.
    c.method.name = "ptuning_v2"
    c.method.num_virtual_tokens = 16
    c.method.prompt_dropout = 0.0

    # Data section: bundled SST-2 (train / GLUE dev).
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
