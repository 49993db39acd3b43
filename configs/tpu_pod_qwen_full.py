"""Full fine-tuning of Qwen2.5-0.5B on a TPU pod slice: FSDP over every chip, bf16, splash attention, full remat.

  pip install -e . "jax[tpu]"   # on every host of the slice
  launch/tpu_pod.sh my-tpu us-central2-b configs/tpu_pod_qwen_full.py gs://my-bucket/runs/qwen-full

(or on each host: `python -m jaxft.train --config=configs/tpu_pod_qwen_full.py --workdir=gs://BUCKET/run`).
Parameters, gradients and Adam moments are split over all chips (`mesh.fsdp=-1`); the workdir must be
visible to every host (a gs:// bucket). `model.attention=auto` picks the Pallas splash kernel on TPU.
Causal LM on the bundled C4 sample, 2,048-token blocks.

Expected memory per chip (`python -m jaxft.plan --config=configs/tpu_pod_qwen_full.py --devices=16
--device_memory=16GB --platform=tpu --config.model.path=DIR`, DIR a local copy of the model's config.json;
without `--platform=tpu` a CPU plans XLA's attention instead of splash): see the README's "Accelerators";
not yet run on a TPU.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen2.5-0.5B"
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

    # Mesh section: FSDP over every chip of the slice.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
