"""Fine-tuning T5 for ADGEN (AdvertiseGen): Chinese clothing attributes -> an advertising text.

  python -m jaxft.train --config=configs/adgen_t5.py
The task and lengths of ChatGLM's P-Tuning v2 example (source `content` such as
`类型#上衣*材质#牛仔布*颜色#白色`, up to 64 tokens; target `summary`, up to 128), on T5: the encoder
reads the content, the decoder learns the summary (`jaxft.data.seq2seq`). Only ADGEN's dev.json is
bundled (1,070 pairs): its last 70 are held out for the loss, perplexity and the ROUGE/BLEU of greedy
answers to 64 of them (scored on characters, as the ChatGLM recipes do; answers in samples/step_N.jsonl).
Every weight of the bundled `jaxft-tiny-t5` trains: on that 5.8M-parameter base P-Tuning v2
(`--config.method.name=ptuning_v2 --config.method.num_virtual_tokens=16 --config.optimizer.learning_rate=1e-2`,
16 prefix keys/values in every decoder self-attention layer, HF PEFT's prefix tuning on T5) learns
nothing (eval loss 8.22 -> 7.96, ROUGE-L 0), while full fine-tuning reaches ROUGE-L 0.147 (BENCHMARKS.md,
"ADGEN on jaxft-tiny-t5"). On a real T5 or a ChatGLM-size decoder, P-Tuning v2 is the recipe's method.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-t5"

    # Method section: every weight trains (see above for P-Tuning v2).
    c.method.name = "full"

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
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 30
    c.eval.at_start = True
    c.eval.generate_examples = 64
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
