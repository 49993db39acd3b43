"""P-Tuning (Liu et al. 2021, v1) on SST-2: 8 virtual tokens from a prompt encoder (an MLP, as PEFT's
PromptEncoder) in front of the input of the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/ptuning.py
`--config.method.encoder=lstm` uses the bidirectional LSTM encoder instead. The export is a HF PEFT
P_TUNING adapter holding the encoder's output (what PEFT serves); the virtual tokens go in front of
the input, as in PEFT; `--config.method.template="[P][P][P][P] {text} [P][P][P][P] It was"` places
them inside the input instead (one `[P]` per virtual token; README, `method.template`).
8 virtual tokens, not PEFT's usual 20: on this 4M-parameter model 20 encoder-made tokens in front of
~25-token sentences hurt the frozen model's features (0.603 dev accuracy after 200 steps, below the
head alone), 8 do less harm (0.656 at step 200); a lower learning rate did not help (1e-3: 0.614).
See docs/method_comparison.md.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (virtual tokens included)

    # Method section.
    c.method.name = "ptuning"
    c.method.num_virtual_tokens = 8
    c.method.encoder = "mlp"
    c.method.encoder_hidden = 128

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
