"""LoRA on T5 for E2E NLG data-to-text: a restaurant's meaning representation -> a sentence about it.

  python -m jaxft.train --config=configs/e2e_t5.py
The encoder reads the meaning representation (`name : Blue Spice | Type : coffee shop | area : city
centre`), the decoder learns the reference text (`jaxft.data.seq2seq`: source + EOS, target + EOS,
-100 after it), LoRA rank 8 on q and v of every attention (encoder self, decoder self and cross:
PEFT's T5 default), over the frozen bundled `jaxft-tiny-t5`. E2E's official train split is not bundled:
this trains on the bundled `valid.txt` (4,672 pairs) and reports the loss and perplexity on the first
512 of `test.txt`. Time and figures: not measured yet (the bundled jaxft-tiny-t5 is new); another T5
with `--config.model.path=DIR` (e.g. a t5-small download) runs the same.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-t5"

    # Method section: LoRA on the attention's q and v (the family's default targets).
    c.method.name = "lora"
    c.method.rank = 8
    c.method.alpha = 16.0
    c.method.dropout = 0.05

    # Data section: meaning representation -> reference, both well under 64 tokens.
    c.data.name = "e2e_nlg"
    c.data.task = "seq2seq"
    c.data.seq_len = 64
    c.data.target_len = 64
    c.data.max_eval_examples = 512

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 30
    c.eval.at_start = True
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
