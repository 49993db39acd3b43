"""BitFit (Ben Zaken et al. 2022) on SST-2: only the bias terms train, plus the classifier head.

  python -m jaxft.train --config=configs/bitfit.py
BitFit needs a model with biases, and the paper's are BERT encoders: the base is the bundled
`jaxft-tiny-bert` (every query, key, value, output, feed-forward and LayerNorm has a bias), so the
config runs offline. BERT's pooler (dense + tanh) and the classifier are new (the bundled masked-LM
checkpoint has neither) and train whole, as the paper's classification layer does. The pooler reads
the mean of the final states (`model.pooling=mean`), not [CLS]: the small bundled encoder's [CLS]
state carries little (SST-2 dev, 3 seeds: 0.557 through [CLS], 0.599 through the mean;
majority class 0.509); `--config.model.pooling=first` gives the paper's head. Other bases:
`--config.model.path=bert-base-uncased`, or a decoder with biases such as Qwen/Qwen2.5-0.5B (q/k/v biases; with `--config.model.pooling=mean`).
The bundled jaxft-tiny (a Llama) has no biases: the run stops with one line saying so.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-bert"
    c.model.pooling = "mean"

    # Method section.
    c.method.name = "bitfit"

    # Data section.
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 60
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
