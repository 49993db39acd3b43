"""GRPO on an encoder-decoder: jaxft-tiny-t5 (every weight) rewarded by ROUGE-L against E2E NLG's references.

  python -m jaxft.train --config=configs/grpo_t5.py
RL4LMs' setting (a seq2seq policy for data-to-text, a reference-based reward) at toy scale. Each prompt
is an E2E meaning representation (`name : Blue Spice | Type : coffee shop | area : city centre`), which
the encoder reads as the seq2seq task reads a source; the decoder samples 4 completions from its start
token; the `rouge=human_reference` reward scores each by ROUGE-L against the record's reference text;
GRPO moves the policy towards the completions that beat their group.
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

    # Training section: 8 prompts x 4 completions of up to 48 tokens per step.
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.log_every_steps = 10
    c.train.grpo_rewards = "rouge=human_reference"
    c.train.grpo_generations = 4
    c.train.grpo_max_new_tokens = 48
    c.train.grpo_beta = 0.04
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 10
    c.eval.at_start = True
    c.eval.every_steps = 50
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 48
    c.checkpoint.every_steps = 100
    return c
