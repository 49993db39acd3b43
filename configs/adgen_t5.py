"""P-Tuning v2 on T5 for ADGEN (AdvertiseGen): Chinese clothing attributes -> an advertising text.

  python -m jaxft.train --config=configs/adgen_t5.py
The task and lengths of ChatGLM's P-Tuning v2 example (source `content` such as
`类型#上衣*材质#牛仔布*颜色#白色`, up to 64 tokens; target `summary`, up to 128), on T5: the encoder
reads the content, the decoder learns the summary (`jaxft.data.seq2seq`), with 16 trained prefix
keys/values in every decoder self-attention layer (HF PEFT's prefix tuning on T5) over the frozen
bundled `jaxft-tiny-t5`. Only ADGEN's dev.json is bundled (1,070 pairs): its last 70 are held out for
the loss and perplexity. Time and figures: not measured yet (the bundled jaxft-tiny-t5 is new).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-t5"

    # Method section: P-Tuning v2 (deep prompts), no reparameterisation MLP.
    c.method.name = "ptuning_v2"
    c.method.num_virtual_tokens = 16

    # Data section: content -> summary (the bundled set's own fields), 70 pairs held out.
    c.data.name = "adgen"
    c.data.task = "seq2seq"
    c.data.eval_holdout = 70
    c.data.seq_len = 64
    c.data.target_len = 128

    # Training section.
    c.train.steps = 400
    c.train.batch_size = 16
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 20
    c.eval.at_start = True
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
