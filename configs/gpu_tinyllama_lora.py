"""LoRA on a 1.1B Llama (TinyLlama) on one NVIDIA GPU: bf16, cuDNN flash attention, 2,048-token blocks.

  pip install -e . "jax[cuda12]"
  python -m jaxft.train --config=configs/gpu_tinyllama_lora.py --config.model.path=TinyLlama/TinyLlama_v1.1

`model.path` is a hub name (online) or a local directory with config.json, safetensors and the
tokenizer. Continued pretraining (causal LM) on the bundled C4 sample, LoRA r=16 on every projection.
The frozen base is stored in bf16 and computed in bf16; LoRA's factors keep fp32 master weights.
`model.attention=auto` picks cuDNN's flash attention on a GPU in bf16; `model.remat=save_dots` keeps
the projections' outputs and recomputes the rest.

Expected memory per device (`python -m jaxft.plan --config=configs/gpu_tinyllama_lora.py
--config.model.path=DIR --device_memory=80GB --platform=gpu`, DIR a local copy of TinyLlama's config.json;
without `--platform=gpu` a CPU plans XLA's attention instead of cuDNN's): see the README's "Accelerators";
not yet run end to end on a GPU with these weights (the GPU check runs the same shapes on random weights).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "TinyLlama/TinyLlama_v1.1"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # the frozen base; trainable leaves stay fp32
    c.model.attention = "auto"
    c.model.remat = "save_dots"

    # Method section.
    c.method.name = "lora"
    c.method.rank = 16
    c.method.alpha = 32.0
    c.method.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    # Data section.
    c.data.name = "c4_demo"
    c.data.task = "causal_lm"
    c.data.seq_len = 2048
    # Blocks cut across documents, as in pretraining: no segment ids, so `auto` can take cuDNN's flash
    # attention (packed rows, each document attending only within itself, would run `chunked`: XLA's einsum
    # in blocks of queries, unfused).
    c.data.packing = False

    # Training section.
    c.train.steps = 500
    c.train.batch_size = 16
    c.train.log_every_steps = 10
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 20
    c.checkpoint.every_steps = 100
    return c
