"""P-Tuning v2 of GLM-4-9B-0414 on ADGEN, one NVIDIA GPU, bf16: ChatGLM's own P-Tuning v2 tutorial.

  pip install -e . "jax[cuda12]"
  python -m jaxft.train --config=configs/gpu_glm4_ptuning_v2_adgen.py --config.model.path=zai-org/GLM-4-9B-0414

ChatGLM-6B's `ptuning/` example, which most Chinese fine-tuning tutorials follow, trains 128 prefix
keys/values in every layer (`pre_seq_len=128`, learning rate 2e-2) on ADGEN (AdvertiseGen: clothing
attributes such as `类型#上衣*材质#牛仔布*颜色#白色` -> an advertising text, sources up to 64 tokens and
targets up to 128) and scores greedy answers by ROUGE and BLEU on characters. Here the same recipe runs
on its successor, GLM-4-0414 (`glm4` in transformers; `glm`, glm-4-9b-chat-hf, loads too): each
`content` goes to the model as a user turn rendered by the tokenizer's chat template, the `summary` is
the answer the loss covers. The frozen base is stored and computed in bf16; only the 128 x 40 layers of
prefix keys and values train (in fp32). The export is a HF PEFT prefix-tuning adapter.

`model.path` is a hub name (online) or a local directory with config.json, safetensors and the tokenizer.
Only ADGEN's dev.json is bundled (1,070 pairs, the last 70 held out); for the tutorial's scale point
`data.name` at AdvertiseGen's train.json (114,599 pairs, the same `content` / `summary` fields) and run
3,000 steps. Expected memory (`python -m jaxft.plan --config=configs/gpu_glm4_ptuning_v2_adgen.py
--config.model.path=DIR --device_memory=80GB --platform=gpu`, DIR holding GLM-4-9B-0414's config.json):
19.7 GiB per GPU (weights 17.5, activations 2.1 under `remat=full`), so a 24 GB card holds it; on 80 GB
`--config.model.remat=none` (34.4 GiB) skips the recomputation. Not yet run on a GPU with these weights.
On CPU, tests/test_configs.py runs it for a few steps on a tiny random GLM-4.

After training, ask it:
  python -m jaxft.generate --model=zai-org/GLM-4-9B-0414 --adapter=runs/gpu_glm4_ptuning_v2_adgen/export --chat \
      --prompt="类型#裙*版型#宽松*颜色#黑色*风格#简约"
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "zai-org/GLM-4-9B-0414"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # the frozen base; the prefixes keep fp32 master weights
    c.model.attention = "auto"
    c.model.remat = "full"

    # Method section: ChatGLM's P-Tuning v2 (pre_seq_len=128, no reparameterisation MLP).
    c.method.name = "ptuning_v2"
    c.method.num_virtual_tokens = 128
    c.method.projection = False

    # Data section: content -> summary, as a chat turn and its answer; the loss covers the answer.
    c.data.name = "adgen"
    c.data.task = "sft"
    c.data.source_field = "content"
    c.data.target_field = "summary"
    c.data.eval_holdout = 70
    c.data.seq_len = 256
    c.data.packing = False

    # Training section.
    c.train.steps = 500
    c.train.batch_size = 16
    c.train.log_every_steps = 10
    c.optimizer.learning_rate = 2e-2
    c.optimizer.warmup_steps = 0
    c.eval.at_start = True
    c.eval.every_steps = 250
    c.eval.generate_examples = 64
    c.eval.max_new_tokens = 128
    c.checkpoint.every_steps = 250
    return c
