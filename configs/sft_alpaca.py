"""LoRA instruction tuning (SFT) of the bundled jaxft-tiny on the bundled Alpaca demos, English and Chinese.

  python -m jaxft.train --config=configs/sft_alpaca.py
About 6 minutes on 2 idle CPU cores (25 measured on a machine shared with 7 other jobs). A mixture of
`alpaca_en_demo` and `alpaca_zh_demo` (1,999 instructions, each source's last 64 held out for
evaluation), sampled half and half, rendered with jaxft's default (Alpaca-layout) chat template since
jaxft-tiny's tokenizer has none, and trained on the response tokens only (`data.train_on_prompt=False`),
packed into rows of 256 tokens. The eval loss on held-out responses (total and per source,
`eval/loss/alpaca_en_demo`, `eval/loss/alpaca_zh_demo`) is logged before training, every 50 steps and
at the end: 8.61 -> 4.72 (English 5.36 -> 4.81, Chinese 11.48 -> 4.63), 2026-11-26, BENCHMARKS.md.
Greedy answers (`python -m jaxft.evaluate --config=configs/sft_alpaca.py --checkpoint=runs/sft_alpaca`,
each source scored alone: `eval/rougeL/alpaca_en_demo`, `eval/rougeL/alpaca_zh_demo`) use a repetition
penalty of 1.2 (`eval.repetition_penalty`, transformers' `repetition_penalty`; the untrained base is
scored with the same decoding, `--checkpoint=jaxft/assets/jaxft-tiny`): English ROUGE-L 0.026 -> 0.073,
Chinese (by characters) 0.0003 -> 0.009, 2026-11-26, BENCHMARKS.md. Without the penalty (1.0) the
trained model loops on list markers ("1. ", blank lines, "1. ", ...) and scores lower than the base (0.032 -> 0.016).

jaxft-tiny was pretrained on SST-2 sentences and C4 text (lowercased English phrases), with a 4,096
piece SentencePiece vocabulary that has byte fallback: every Chinese character it has not seen as a
piece costs three byte tokens, so Chinese examples are ~3x longer in tokens than in characters and
are often truncated (the prompt cut from the left, the response from the right; counted in the log).
The base knows little of instruction data in either language: this shows the SFT path working, not
a useful assistant.
"""

from jaxft.config import base_config
from jaxft.data.sources import ASSETS


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"

    # Method section: LoRA on every projection.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section.
    en, zh = ASSETS / "alpaca_en_demo" / "alpaca_en_demo.json", ASSETS / "alpaca_zh_demo" / "alpaca_zh_demo.json"
    c.data.name = f"{en}+{zh}"
    c.data.task = "sft"
    c.data.weights = "0.5,0.5"
    c.data.eval_holdout = 64
    c.data.seq_len = 256
    c.data.packing = True

    # Training section.
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.log_every_steps = 25
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 20
    c.eval.at_start = True
    c.eval.every_steps = 50
    # Generation (jaxft.evaluate; training's eval with eval.generate_examples=N): greedy, 64 new tokens,
    # repeated tokens penalised, without which the trained 4M model loops on list markers.
    c.eval.repetition_penalty = 1.2
    c.checkpoint.every_steps = 50
    return c
