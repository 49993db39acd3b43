"""Pretrain jaxft-tiny: a 4-layer Llama (4.2M parameters) on the SST-2 training sentences and C4 text.

This is how the bundled model `jaxft/assets/jaxft-tiny` was made (see its README.md):
  python -m jaxft.tokenizer --data=sst2+c4_demo --vocab_size=4096 --out=/tmp/jaxft-tiny-tokenizer
  python -m jaxft.train --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny
  cp runs/pretrain_tiny/export/* jaxft/assets/jaxft-tiny/
About 30 minutes on 2 CPU cores. The SST-2 labels are not used: the texts are packed into 64-token
blocks and the model learns next-token prediction.
"""

import ml_collections

from jaxft.config import base_config


def get_config():
    c = base_config()

    # Model section: built from scratch, tokenizer from `python -m jaxft.tokenizer`.
    c.model.path = ""
    c.model.tokenizer = "/tmp/jaxft-tiny-tokenizer"
    c.model.init = ml_collections.ConfigDict(
        dict(
            model_type="llama",
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    )
    c.method.name = "full"

    # Data section: SST-2 training sentences (labels unused; each treebank sentence followed by its
    # sub-phrases, see `sources.group_phrases`) and 300 C4 web documents, packed.
    c.data.name = "sst2_grouped+c4_demo"
    c.data.task = "causal_lm"
    c.data.seq_len = 64
    c.data.packing = False  # as jaxft-tiny was trained: blocks attend across documents (no segment ids)

    # Training section.
    c.train.steps = 1200
    c.train.batch_size = 64
    c.train.log_every_steps = 100
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.1
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 10
    return c
