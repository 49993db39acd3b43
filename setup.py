from setuptools import find_packages, setup

setup(
    name="jaxft",
    version="0.1.0",
    description="Fine-tuning language models in JAX/Flax: full, head, LoRA, P-Tuning v2, sharded and resumable.",
    packages=find_packages(include=["jaxft", "jaxft.*"]),
    package_data={"jaxft": ["assets/**/*", "assets/*/*", "assets/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8.2",  # jax.lax.pcast (a mixture's tensor-parallel experts)
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "etils[epath]",  # run outputs on local disk or gs:// (jaxft.storage)
        "tokenizers>=0.20",  # HF tokenizer files (jaxft.hf_tokenizer); transformers is a test oracle only
        "huggingface_hub>=0.24",  # hub names, when online
        "safetensors>=0.4",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "jinja2>=3.1.6",  # SFT: chat templates (as transformers renders them; 3.1.6 closes sandbox escapes)
        "ml-collections>=0.1.1",
        "absl-py",
        "tensorboard>=2.15",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # torch is pinned: on the project's machines 2.13.0 is a local CPU wheel.
        # pytest-xdist: the README's test command runs the suite in two processes, one test file each at a time.
        # transformers, torch and peft are the oracles of the models, tokenizers and methods;
        # rouge-score, sacrebleu and scikit-learn are the oracles of jaxft.metrics (tests/test_metrics.py), seqeval
        # of jaxft.entities (NER).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=4.45", "torch==2.13.0", "peft>=0.13", "rouge-score>=0.1.2", "sacrebleu>=2.3", "scikit-learn", "seqeval>=1.2"],
    },
)
