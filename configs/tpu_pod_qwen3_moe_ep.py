"""Full fine-tuning of Qwen3-30B-A3B (128 experts, 8 per token) on a 64-chip TPU pod slice: the experts split
8 ways (expert parallelism), everything else 8 ways (FSDP), bf16, splash attention, full remat.

  pip install -e . "jax[tpu]"   # on every host of the slice
  launch/tpu_pod.sh my-tpu us-east5-a configs/tpu_pod_qwen3_moe_ep.py gs://my-bucket/runs/qwen3-moe

(or on each host: `python -m jaxft.train --config=configs/tpu_pod_qwen3_moe_ep.py --workdir=gs://BUCKET/run`).
`mesh.expert=8` gives each chip 16 whole experts: each layer gathers the tokens of its 8 expert-axis
neighbours instead of every expert's weights (README, "Mixtures of experts"); `mesh.fsdp=-1` splits the rest
of the parameters, the gradients and the Adam moments over the other factor of 8. The workdir must be
visible to every host (a gs:// bucket). Causal LM on the bundled C4 sample, 2,048-token blocks; the routers'
load-balancing loss as the model's config.json sets it.

Expected memory per chip (`python -m jaxft.plan --config=configs/tpu_pod_qwen3_moe_ep.py --devices=64
--device_memory=95GB --platform=tpu --config.model.path=DIR`, DIR a local copy of the model's config.json):
see the README's "Accelerators"; not yet run on a TPU.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen3-30B-A3B"
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"
    c.model.remat = "full"

    # Method section.
    c.method.name = "full"

    # Data section.
    c.data.name = "c4_demo"
    c.data.task = "causal_lm"
    c.data.seq_len = 2048

    # Training section.
    c.train.steps = 500
    c.train.batch_size = 64
    c.train.log_every_steps = 10
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.checkpoint.every_steps = 100

    # Mesh section: the experts over 8 chips, everything else over the other 8.
    c.mesh.data = 1
    c.mesh.expert = 8
    c.mesh.fsdp = -1
    return c
