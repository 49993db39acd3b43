"""PPO with LoRA and a value head: the bundled jaxft-tiny taught to write positive movie-review phrases.

  python -m jaxft.train --config=configs/ppo_lora.py
About a minute on 2 CPU cores. configs/grpo_lora.py's task (SST-2 sentence beginnings as prompts, the
`sentiment` lexicon as the reward) with PPO's learned critic instead of GRPO's groups: one completion per
prompt, 32 prompts per batch of completions, each batch trained for 2 optimizer steps (PPO's epochs), a
value head on the final hidden states, per-token rewards of -0.05 x the KL to the start plus the
completion's reward at its end, GAE (gamma 1, lambda 0.95). Eval (before training, every 25 steps, at the
end): the mean reward of greedy completions of 64 held-out SST-2 dev prompts. Measured on 2026-11-27
(BENCHMARKS.md): eval/reward 0.10 -> 0.35 -> 0.42 -> 0.50 -> 0.52 at steps 0-100 with short sentences
("it 's a charming and often" -> "funny film ."), KL to the start 0.29; seed 1: 0.28 / 0.47 / 0.45 / 0.48.
`--config.train.ppo_critic=jaxft-tiny` gives it a critic of its own instead of the value head (a second
jaxft-tiny, every weight trained; a reward model's directory or export also serves): 0.29 / 0.52 / 0.50 /
0.52 at steps 25-100 (2026-11-28).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"

    # Method section: LoRA on every projection (the value head is PPO's own and always trains).
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.dropout = 0.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section: SST-2 sentences as prompts, each cut to its first 8 tokens (BOS included).
    c.data.name = "sst2"
    c.data.task = "ppo"
    c.data.seq_len = 8

    # Training section: 32 prompts x 1 completion of up to 24 tokens, each batch trained 2 steps.
    c.train.steps = 100
    c.train.batch_size = 32
    c.train.log_every_steps = 10
    c.train.grpo_rewards = "sentiment"
    c.train.grpo_generations = 1
    c.train.grpo_iterations = 2
    c.train.grpo_max_new_tokens = 24
    c.train.grpo_beta = 0.05
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 5
    c.eval.at_start = True
    c.eval.every_steps = 25
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 24
    c.checkpoint.every_steps = 50
    return c
