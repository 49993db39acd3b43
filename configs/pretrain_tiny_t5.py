"""Pretrain jaxft-tiny-t5: a small T5 (3 + 3 layers, gated GELU) with T5's span corruption on bundled text.

This is how the bundled model `jaxft/assets/jaxft-tiny-t5` was made (see its README.md):
  python -m jaxft.tokenizer --kind=t5 --data=sst2+c4_demo+chnsenticorp --vocab_size=3996 \
      --out=/tmp/jaxft-tiny-t5-tokenizer
  python -m jaxft.train --config=configs/pretrain_tiny_t5.py --workdir=runs/pretrain_tiny_t5
  cp runs/pretrain_tiny_t5/export/* jaxft/assets/jaxft-tiny-t5/
The tokenizer has 3,996 SentencePiece pieces and T5's 100 sentinels after them (4,096 ids). The texts
of SST-2 (labels unused), 300 C4 documents and the ChnSentiCorp reviews (labels unused) are packed,
each followed by </s>, into 141-token blocks; T5's span corruption (`data.task=span_corruption`:
15% noise in spans of mean length 3, each span one sentinel) makes 128-token inputs and 29-token
targets, drawn anew for every batch (as BERT's masks: `tasks.redraw`).
"""

import ml_collections

from jaxft.config import base_config


def get_config():
    c = base_config()

    # Model section: built from scratch (HF T5ForConditionalGeneration layout), T5 SentencePiece tokenizer.
    c.model.path = ""
    c.model.tokenizer = "/tmp/jaxft-tiny-t5-tokenizer"
    c.model.init = ml_collections.ConfigDict(
        dict(
            model_type="t5",
            architectures=["T5ForConditionalGeneration"],
            vocab_size=4096,
            d_model=256,
            d_kv=64,
            d_ff=512,
            num_layers=3,
            num_decoder_layers=3,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",  # T5 v1.1's feed-forward; the LM head is tied (v1.0): 1M fewer parameters
            tie_word_embeddings=True,
            dropout_rate=0.0,  # as T5 v1.1 was pretrained
            layer_norm_epsilon=1e-6,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    c.method.name = "full"

    # Data section: as jaxft-tiny-bert's, SST-2 half of it.
    c.data.name = "sst2+c4_demo+chnsenticorp"
    c.data.weights = "2,1,1"
    c.data.task = "span_corruption"
    c.data.seq_len = 128  # the encoder's input; the targets are 29 tokens
    c.data.max_eval_examples = 300  # dev: the first 300 SST-2 sentences and 300 ChnSentiCorp reviews

    # Training section: 2,000 x 16 x 141 = 4.5M tokens (sized for a 2-core CPU).
    c.train.steps = 2000
    c.train.batch_size = 16
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 500
    c.eval.at_start = True  # the untrained model's dev loss, for comparison
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 10
    return c
