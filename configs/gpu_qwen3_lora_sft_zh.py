"""LoRA instruction tuning (SFT) of Qwen3-0.6B on the bundled Chinese Alpaca demos, one NVIDIA GPU, bf16.

  pip install -e . "jax[cuda12]"
  python -m jaxft.train --config=configs/gpu_qwen3_lora_sft_zh.py --config.model.path=Qwen/Qwen3-0.6B

`model.path` is a hub name (online) or a local directory with config.json, safetensors and the
tokenizer (whose chat template renders the conversations). The 1,000 `alpaca_zh_demo` instructions,
the last 64 held out, each rendered in Qwen3's non-thinking mode (`data.chat_template_kwargs=
enable_thinking=false`: the generation prompt ends with an empty `<think>` block, so the answers are
learned without reasoning, as `apply_chat_template(..., enable_thinking=False)` renders them). The
loss covers the answers only. One example per row, padded to length buckets (`data.packing=False`),
so `model.attention=auto` takes cuDNN's flash attention (packed rows would run `chunked`, XLA's einsum
in blocks of queries). LoRA
r=16 on every projection; the frozen base is stored and computed in bf16.

After training, talk to it:
  python -m jaxft.generate --model=Qwen/Qwen3-0.6B --adapter=runs/NAME/export --chat \
      --chat_template_kwargs=enable_thinking=false --prompt="用一句话介绍一下北京"

Expected memory per device (`python -m jaxft.plan --config=configs/gpu_qwen3_lora_sft_zh.py
--device_memory=80GB --platform=gpu`, on a local copy of the model's config.json): see the README's
"Accelerators"; not yet run on a GPU with these weights. On CPU, tests/test_configs.py runs it for a
few steps on a tiny random Qwen3 with a ChatML tokenizer.
"""

from jaxft.config import base_config
from jaxft.data.sources import ASSETS


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen3-0.6B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # the frozen base; LoRA's factors keep fp32 master weights
    c.model.attention = "auto"

    # Method section: LoRA on every projection.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section.
    c.data.name = str(ASSETS / "alpaca_zh_demo" / "alpaca_zh_demo.json")
    c.data.task = "sft"
    c.data.chat_template_kwargs = "enable_thinking=false"
    c.data.eval_holdout = 64
    c.data.seq_len = 1024
    c.data.packing = False

    # Training section.
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.log_every_steps = 10
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 20
    c.eval.at_start = True
    c.eval.every_steps = 100
    c.checkpoint.every_steps = 100
    return c
