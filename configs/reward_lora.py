"""A reward model with LoRA: jaxft-tiny with a one-output head, trained to score the chosen answer of each
bundled preference pair above the rejected one (Bradley-Terry, as TRL's RewardTrainer).

  python -m jaxft.train --config=configs/reward_lora.py
About 4 minutes on 2 CPU cores. The pairs of `configs/dpo_lora.py` (LLaMA-Factory's `dpo_en_demo` and `dpo_zh_demo`, the last 32 of
each held out), rendered with jaxft's default chat template and cut to 256 tokens per answer. The
head reads the last token's state, as transformers' sequence classifiers do, so the export (a PEFT
adapter with the head in `modules_to_save`) serves as a transformers reward model:
`AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)` + `PeftModel.from_pretrained`.
Eval (before training, every 25 steps, at the end): the loss, the share of held-out pairs whose
chosen answer scores higher (`eval/accuracy`) and the mean rewards of both answers and their margin;
`python -m jaxft.evaluate --config=configs/reward_lora.py --checkpoint=runs/reward_lora` scores a
checkpoint or an export the same way.

Measured on 2026-11-27 (BENCHMARKS.md): the path works, the base cannot judge these answers. The
training pairs are learned slowly (train loss 0.54, accuracy 0.75 on the batch at step 150) and the 64
held-out pairs stay at chance (eval loss 0.704 -> 0.735, accuracy 0.52 -> 0.53). At lr 3e-4 nothing
was learned in 100 steps; a head on the mean of the states did no better (held-out accuracy 0.53).
"""

from jaxft.config import base_config
from jaxft.data.sources import ASSETS


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "last"  # transformers' sequence classifiers read the last real token

    # Method section: LoRA on every projection; the new one-output head trains too.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section: preference pairs scored by a classifier (data.task=reward; on its own the data says dpo).
    en, zh = ASSETS / "dpo_demo" / "dpo_en_demo.json", ASSETS / "dpo_demo" / "dpo_zh_demo.json"
    c.data.name = f"{en}+{zh}"
    c.data.task = "reward"
    c.data.weights = "0.5,0.5"
    c.data.eval_holdout = 32
    c.data.seq_len = 256

    # Training section.
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.log_every_steps = 25
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 10
    c.eval.at_start = True
    c.eval.every_steps = 25
    c.checkpoint.every_steps = 50
    return c
