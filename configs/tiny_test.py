"""A seconds-long smoke run on synthetic token ids and a 2-layer random Llama (no files needed).

Used by the tests; handy to check an installation:
  python -m jaxft.train --config=configs/tiny_test.py --workdir=/tmp/jaxft-smoke
"""

import ml_collections

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = ""
    c.model.init = ml_collections.ConfigDict(
        dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    )
    c.method.name = "lora"
    c.method.rank = 4
    c.data.name = "synthetic"
    c.data.seq_len = 16
    c.data.synthetic_examples = 256
    c.train.steps = 8
    c.train.batch_size = 8
    c.train.log_every_steps = 2
    c.optimizer.learning_rate = 1e-2
    c.checkpoint.every_steps = 4
    return c
