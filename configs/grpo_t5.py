"""GRPO on an encoder-decoder: jaxft-tiny-t5 (every weight) rewarded by ROUGE-L against E2E NLG's references.

  python -m jaxft.train --config=configs/grpo_t5.py
About 3.5 minutes on 2 CPU cores. RL4LMs' setting (a seq2seq policy for data-to-text, a reference-based
reward) at toy scale: each prompt is an E2E meaning representation (`name : Blue Spice | Type : coffee
shop | area : city centre`), which the encoder reads as the seq2seq task reads a source; the decoder
samples 4 completions from its start token; the `rouge=human_reference` reward scores each by ROUGE-L
against the record's reference; GRPO moves the policy towards the completions that beat their group.
Eval: greedy completions of the first 64 records of E2E's test.txt (14 meaning representations), each
scored against its record's reference.

Measured (BENCHMARKS.md, "CPU: GRPO on T5"): from the bundled base, which was only pretrained on span
corruption and answers with sentinel tokens, eval/reward 0.004 -> 0.06 in 100 steps, by writing common
words ("the is the is ..."): the reward is learned, the task is not. RL4LMs starts RL from a supervised
policy; so does this, in two commands (the second 0.23 -> 0.25, the sampled reward 0.24 -> 0.29):
  python -m jaxft.train --config=configs/e2e_t5.py --config.train.steps=200 --config.eval.every_steps=0
  python -m jaxft.train --config=configs/grpo_t5.py --config.model.path=runs/e2e_t5/export
      --config.optimizer.learning_rate=1e-4 --config.train.grpo_beta=0.1 --config.train.grpo_temperature=0.7
      --config.train.grpo_mask_truncated=True
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-t5"

    # Method section: every weight trains (LoRA on the 5.8M base learns little, as for configs/e2e_t5.py).
    c.method.name = "full"

    # Data section: E2E meaning representations as the encoder's sources (96 tokens keep every one whole).
    c.data.name = "e2e_nlg"
    c.data.task = "grpo"
    c.data.seq_len = 96

    # Training section: 4 prompts x 4 completions of up to 48 tokens per step.
    c.train.steps = 100
    c.train.batch_size = 4
    c.train.log_every_steps = 10
    c.train.grpo_rewards = "rouge=human_reference"
    c.train.grpo_generations = 4
    c.train.grpo_max_new_tokens = 48
    c.train.grpo_beta = 0.04
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10
    c.eval.at_start = True
    c.eval.every_steps = 25
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 48
    c.checkpoint.every_steps = 100
    return c
