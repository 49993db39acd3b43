"""Fine-tuning T5 for E2E NLG data-to-text: a restaurant's meaning representation -> a sentence about it.

  python -m jaxft.train --config=configs/e2e_t5.py
The encoder reads the meaning representation (`name : Blue Spice | Type : coffee shop | area : city
centre`), the decoder learns the reference text (`jaxft.data.seq2seq`: source + EOS, target + EOS,
-100 after it). E2E's official train split is not bundled: this trains on the bundled `valid.txt`
(4,672 pairs) and scores the first 512 lines of `test.txt` (loss, perplexity; ROUGE and BLEU of
greedy answers with `--config.eval.generate_examples=N`).
The base is the bundled `jaxft-tiny-t5` (5.8M parameters), and all of it trains: on that small base,
LoRA (`--config.method.name=lora`, rank 8 on q and v, PEFT's T5 default) learns one sentence for every
input (BLEU 0.02 after 600 steps), while full fine-tuning reaches BLEU 18 in 400 steps (BENCHMARKS.md,
"E2E on jaxft-tiny-t5"). On a real T5 (`--config.model.path=DIR`, e.g. a t5-small download) LoRA
is the usual choice.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-t5"

    # Method section: every weight trains (see above for LoRA).
    c.method.name = "full"

    # Data section: meaning representation -> reference. jaxft-tiny-t5's 4k pieces cut E2E's names and
    # attributes finely: sources are 66 tokens at the median and 88 at most, references 55 / 91 at the
    # 50th / 99th percentile, so 96 keeps every source whole (64 cut 58% of them).
    c.data.name = "e2e_nlg"
    c.data.task = "seq2seq"
    c.data.seq_len = 96
    c.data.target_len = 96
    c.data.max_eval_examples = 512

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 30
    c.eval.at_start = True
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
