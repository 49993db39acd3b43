"""QLoRA instruction tuning (SFT) of Qwen3-30B-A3B (a mixture of 128 experts, 8 per token) on the bundled
Chinese Alpaca demos, one 80 GB NVIDIA GPU.

  pip install -e . "jax[cuda12]"
  python -m jaxft.train --config=configs/gpu_qwen3_moe_qlora_sft_zh.py --config.model.path=Qwen/Qwen3-30B-A3B

The frozen base, the experts included, is stored in NF4 (`model.quantization=nf4`: 30.5B weights in 15.6
GiB) and computed in bf16; LoRA r=16 trains the attention projections (the experts are stacked weights,
not modules: see the README's models). The 1,000 `alpaca_zh_demo` instructions, the last 64 held out,
rendered in Qwen3's non-thinking mode (`data.chat_template_kwargs=enable_thinking=false`), the loss on
the answers only, one example per row (`data.packing=False`, so `model.attention=auto` takes cuDNN).
The routers' load-balancing loss follows the model's config.json (off for Qwen3-30B-A3B);
`--config.model.router_aux_loss_coef=0.001` turns it on.

After training, talk to it:
  python -m jaxft.generate --model=Qwen/Qwen3-30B-A3B --adapter=runs/NAME/export --chat \
      --chat_template_kwargs=enable_thinking=false --prompt="用一句话介绍一下北京"

Expected memory per device (`python -m jaxft.plan --config=configs/gpu_qwen3_moe_qlora_sft_zh.py
--device_memory=80GB --platform=gpu`, on a local copy of the model's config.json): see the README's
"Accelerators"; not yet run on a GPU with these weights. On CPU, tests/test_configs.py runs it for a
few steps on a tiny random Qwen3-MoE with a ChatML tokenizer.
"""

from jaxft.config import base_config
from jaxft.data.sources import ASSETS


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen3-30B-A3B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # what the NF4 blocks dequantize to; LoRA's factors keep fp32 master weights
    c.model.quantization = "nf4"
    c.model.attention = "auto"

    # Method section: LoRA on the attention projections.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj"

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
