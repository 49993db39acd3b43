"""LoRA on the bundled jaxft-tiny for E2E NLG data-to-text (the task of the LoRA paper's GPT-2 runs), scored
with BLEU and ROUGE during training.

  python -m jaxft.train --config=configs/e2e_lora.py
  python -m jaxft.evaluate --config=configs/e2e_lora.py --checkpoint=runs/e2e_lora
Bundled E2E (`jaxft/assets/e2e_nlg`): trained on valid.txt's 4,672 (meaning representation ->
reference) pairs as SFT source/target pairs (jaxft's default Alpaca-layout prompt, loss on the
reference only), evaluated on the first 500 lines of test.txt: the loss, and every 100 steps the
greedy answers to its first 64 distinct meaning representations, scored against all their
references (eval/bleu, eval/rougeL, ...). Offline; 31 minutes measured on the 2-core machine shared
with other jobs (load average 8-37; an idle machine takes a fraction of that). Dev (67 MRs): BLEU
0.48 -> 24.1, ROUGE-L 0.093 -> 0.362, loss 5.63 -> 3.69 (2026-11-26, BENCHMARKS.md).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"

    # Method section: LoRA on every projection.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section: `name : X | food : Y ...` -> a sentence.
    c.data.name = "e2e_nlg"
    c.data.task = "sft"
    c.data.source_field = "meaning_representation"
    c.data.target_field = "human_reference"
    c.data.seq_len = 160
    c.data.packing = True
    c.data.max_eval_examples = 500

    # Training section.
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.log_every_steps = 25
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20

    # Eval section: the loss, and BLEU / ROUGE of generated answers.
    c.eval.at_start = True
    c.eval.every_steps = 100
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 64
    c.checkpoint.every_steps = 100
    return c
