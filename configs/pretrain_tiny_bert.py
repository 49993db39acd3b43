"""Pretrain jaxft-tiny-bert: a 4-layer BERT (5.5M parameters) with BERT's masked-LM objective on bundled text.

This is how the bundled model `jaxft/assets/jaxft-tiny-bert` was made (see its README.md):
  python -m jaxft.tokenizer --kind=wordpiece --data=sst2+c4_demo+chnsenticorp --vocab_size=8192 \
      --out=/tmp/jaxft-tiny-bert-tokenizer
  python -m jaxft.train --config=configs/pretrain_tiny_bert.py --workdir=runs/pretrain_tiny_bert
  cp runs/pretrain_tiny_bert/export/* jaxft/assets/jaxft-tiny-bert/
The texts of SST-2 (labels unused), 300 C4 documents and the ChnSentiCorp reviews (labels unused) are
packed as `[CLS] text [SEP] [CLS] text [SEP] ...` into 64-token blocks; 15% of the tokens are
targets (80% [MASK], 10% a random token, 10% kept: `data.task=masked_lm`), drawn anew for every batch
(RoBERTa's dynamic masking: the bundled text is small, and its blocks recur many times).
"""

import ml_collections

from jaxft.config import base_config


def get_config():
    c = base_config()

    # Model section: built from scratch (HF BertForMaskedLM layout), WordPiece tokenizer from
    # `python -m jaxft.tokenizer --kind=wordpiece`.
    c.model.path = ""
    c.model.tokenizer = "/tmp/jaxft-tiny-bert-tokenizer"
    c.model.init = ml_collections.ConfigDict(
        dict(
            model_type="bert",
            architectures=["BertForMaskedLM"],
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
            type_vocab_size=2,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            pad_token_id=0,
        )
    )
    c.method.name = "full"

    # Data section: English (SST-2 phrases, C4) and Chinese (ChnSentiCorp reviews), SST-2 half of it.
    c.data.name = "sst2+c4_demo+chnsenticorp"
    c.data.weights = "2,1,1"
    c.data.task = "masked_lm"
    c.data.seq_len = 64
    c.data.packing = False  # blocks attend across documents, as jaxft-tiny's

    c.data.max_eval_examples = 100  # dev: the first 100 SST-2 sentences and 100 ChnSentiCorp reviews

    # Training section: 4,000 x 32 x 64 = 8.2M tokens (jaxft-tiny saw 4.9M, but a causal LM learns from
    # every token and a masked LM from 15% of them).
    c.train.steps = 4000
    c.train.batch_size = 32
    c.train.log_every_steps = 100
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 500
    c.eval.at_start = True  # the untrained model's dev loss, for comparison
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 10
    return c
