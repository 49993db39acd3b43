"""Full fine-tuning of the bundled jaxft-tiny on SST-2: every weight trains.

  python -m jaxft.train --config=configs/full.py
About 1.5 minutes on 2 CPU cores; SST-2 dev accuracy 0.792 (2026-11-25). The export is a Hugging Face
LlamaForSequenceClassification directory whose config says `classifier_pooling: mean`: transformers
reads the last token instead, so see the README's "Serving a classifier" for the PyTorch recipe.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (see `jaxft.models.llama.pool`)
    c.method.name = "full"

    # Data section.
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
