"""GRPO with LoRA: the bundled jaxft-tiny taught to write positive movie-review phrases, rewarded by a lexicon.

  python -m jaxft.train --config=configs/grpo_lora.py
About a minute on 2 CPU cores. The classic RLHF demonstration (TRL's GPT-2 sentiment example): each
prompt is the first tokens of an SST-2 training sentence; the policy completes it 4 times by sampling,
the `sentiment` reward scores each completion by counting positive and negative words (`jaxft.rewards`:
a lexicon, a toy reward), and GRPO moves the policy towards the completions that beat their group.
Eval (before training, every 25 steps, at the end): the mean reward of greedy completions of 64
held-out SST-2 dev prompts (`eval/reward`), the completions in samples/step_N.jsonl. Measured on
2026-11-27 (BENCHMARKS.md): eval/reward 0.10 -> 0.31 -> 0.68 -> 0.76 -> 0.82 at steps 0-100, KL to the
start 0.27. Much of the gain is reward hacking, as a word-count reward invites: many completions
repeat "funny , funny , ...", others read "s the best film is a good movie that is n't a good movie .".
`--config.train.grpo_beta=0.2` keeps the policy nearer its start: fluent completions ("funny film .",
"ing , but it 's a good one ."), reward 0.65 (KL 0.07; 0.34 with seed 1); 0.04 hacks it more (0.90).

With a real base and a verifiable reward (GSM8K: the question is the prompt, in the model's chat
template; `answer`, "... #### 72", is the reference the `accuracy` reward reads):
  --config.model.path=Qwen/Qwen2.5-0.5B-Instruct --config.data.name=hub:openai/gsm8k
  --config.data.hub_config=main --config.data.source_field=question --config.data.target_field=answer
  --config.data.seq_len=256 --config.train.grpo_rewards=accuracy --config.train.grpo_max_new_tokens=256
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"

    # Method section: LoRA on every projection; no dropout, so the policy samples what it trains.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.dropout = 0.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section: SST-2 sentences as prompts, each cut to its first 8 tokens (BOS included).
    c.data.name = "sst2"
    c.data.task = "grpo"
    c.data.seq_len = 8

    # Training section: 8 prompts x 4 completions of up to 24 tokens per step.
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.log_every_steps = 10
    c.train.grpo_rewards = "sentiment"
    c.train.grpo_generations = 4
    c.train.grpo_max_new_tokens = 24
    c.train.grpo_beta = 0.1
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 5
    c.eval.at_start = True
    c.eval.every_steps = 25
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 24
    c.checkpoint.every_steps = 50
    return c
