"""Prompt tuning (Lester et al. 2021) on SST-2: 20 virtual token embeddings in front of the input of the
frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/prompt_tuning.py
The prompt starts from the embeddings of a text (`method.prompt_init=text`, PEFT's PromptTuningInit.TEXT,
tokenized with the run's tokenizer); `method.prompt_init=vocab` samples vocabulary embeddings instead,
`random` draws N(0, method.init_std). The export is a HF PEFT PROMPT_TUNING adapter.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"  # the head reads the mean of the final states (virtual tokens included)

    # Method section.
    c.method.name = "prompt_tuning"
    c.method.num_virtual_tokens = 20
    c.method.prompt_init = "text"
    c.method.prompt_init_text = "Is the sentiment of this movie review positive or negative?"

    # Data section.
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 3e-2
    c.optimizer.warmup_steps = 30
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
