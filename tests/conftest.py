"""Tests run on 8 fake CPU devices, so sharding is exercised without an accelerator."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The data cache (tokenized arrays) of the tests' runs stays out of the user's ~/.cache/jaxft.
if "JAXFT_CACHE" not in os.environ:
    import tempfile

    os.environ["JAXFT_CACHE"] = tempfile.mkdtemp(prefix="jaxft-test-cache-")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


import random  # noqa: E402

import pytest  # noqa: E402

EN = "the a movie film is was very good bad funny boring story actor charming , . it 's not and of".split()
ZH = "我们今天电影很好看不喜欢"  # few distinct characters: vocab_size=300 must hold them next to 256 bytes


def synthetic_texts(n=400, seed=0):
    """English and Chinese sentences for training small SentencePiece models in tests."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n // 2):
        texts.append(" ".join(rng.choice(EN) for _ in range(rng.randint(3, 12))))
        texts.append("".join(rng.choice(ZH) for _ in range(rng.randint(4, 12))))
    return texts


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    from jaxft.tokenizer import train_sentencepiece

    return train_sentencepiece(synthetic_texts(), tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test file starts with JAX's compilation caches empty: one process runs the whole suite, and
    hundreds of files' executables held at once have crashed XLA's CPU compiler (a segfault late in a run)."""
    yield
    import jax

    jax.clear_caches()
