"""DPO with LoRA: the bundled jaxft-tiny taught to prefer the chosen answers of the bundled preference pairs.

  python -m jaxft.train --config=configs/dpo_lora.py
About 3 minutes on 2 CPU cores (the reference pass over the 600 pairs included). A mixture of LLaMA-Factory's `dpo_en_demo` and `dpo_zh_demo` (300 English and 300 Chinese pairs, each
source's last 32 held out for evaluation), rendered with jaxft's default chat template and cut to 256
tokens per answer. The reference is the run's starting point, here the frozen base (LoRA starts as the
identity); its log-likelihoods of every answer are computed once before training. Eval (before
training, every 25 steps, at the end): the DPO loss (log 2 = 0.6931 at the start), the share of
held-out pairs whose chosen answer gains more than the rejected one (`eval/accuracy`), and the mean
rewards beta * (log pi - log ref) of both answers and their margin. Measured on 2026-11-27
(BENCHMARKS.md): the training pairs are learned (train loss 0.56, accuracy 0.88 at step 100), the 64
held-out pairs barely: eval loss 0.6931 -> 0.6755, reward margin 0 -> 0.068, accuracy 0.53 (one
held-out pair is 0.016; at lr 1e-3 and 150 steps the eval loss rose to 0.748, train accuracy 1.0).

jaxft-tiny is a 4M model pretrained on SST-2 sentences: this shows the DPO path working end to end,
not a useful assistant. With a real base: `--config.model.path=Qwen/Qwen2.5-0.5B-Instruct` (or a local
directory), whose chat template is used.
"""

from jaxft.config import base_config
from jaxft.data.sources import ASSETS


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"

    # Method section: LoRA on every projection; no dropout, so step 0 is exactly the reference.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.dropout = 0.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section: preference pairs (`chosen`, `rejected`), recognised by their fields (data.task=dpo).
    en, zh = ASSETS / "dpo_demo" / "dpo_en_demo.json", ASSETS / "dpo_demo" / "dpo_zh_demo.json"
    c.data.name = f"{en}+{zh}"
    c.data.task = "dpo"
    c.data.weights = "0.5,0.5"
    c.data.eval_holdout = 32
    c.data.seq_len = 256

    # Training section.
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.log_every_steps = 25
    c.train.dpo_beta = 0.1
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 10
    c.eval.at_start = True
    c.eval.every_steps = 25
    c.checkpoint.every_steps = 50
    return c
