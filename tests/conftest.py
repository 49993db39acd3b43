"""Tests run on 8 fake CPU devices, so sharding is exercised without an accelerator."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The data cache (tokenized arrays) of the tests' runs stays out of the user's ~/.cache/jaxft.
if "JAXFT_CACHE" not in os.environ:
    import tempfile

    os.environ["JAXFT_CACHE"] = tempfile.mkdtemp(prefix="jaxft-test-cache-")
# One persistent XLA compilation cache per test run, shared by pytest-xdist's workers (they inherit this
# process's environment, or meet in one directory named by the run's id) and by every `python -m jaxft.train`
# a CLI test spawns: resumed runs, seeds and configs over the same model compile the same programs, and on
# CPU compiling is most of a tiny run's time. A hit is the executable XLA built for the same program and
# options, so no result changes. No size limit: that would turn on JAX's LRU eviction, which lists and reads
# the whole directory on every write. Without its lock, a read racing a write of the same entry fails to
# decompress, and JAX warns and compiles instead.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run:
        _xla_cache = os.path.join(tempfile.gettempdir(), f"jaxft-test-xla-{run}")
        os.makedirs(_xla_cache, exist_ok=True)
    else:
        _xla_cache = _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="jaxft-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM codegen unoptimized (JAX's own switch: XLA's backend optimization level 0, no expensive LLVM passes):
# a tiny run compiles in about 2/3 of the CPU time, and even 30 steps of the bundled model cost no more in
# all. XLA's HLO passes are the same, so what tests read of a compiled program (collectives, memory
# analysis) is too; numbers can differ from an optimized build in the last bit (no FMA contraction).
if os.environ["JAX_PLATFORMS"] == "cpu":  # kernels on an accelerator are tested as users compile them
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# Fusions through XLA:CPU's elemental IR emitters, not its newer MLIR fusion emitters: the tiny models' train
# steps compile in about a third of the time (jaxft-tiny's LoRA step: 1.0-1.3 s against 3.0-3.5 s), which cuts
# a quarter of the suite's time. Subprocess runs get the same flags (`test_train.xla_flags`).
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_cpu_use_fusion_emitters" not in flags:
    flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = flags.strip()


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


def pytest_unconfigure(config):
    """The compilation cache this process made goes with it (xdist's workers leave it to the controller)."""
    if _OWN_XLA_CACHE and not hasattr(config, "workerinput"):
        import shutil

        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


# The README's test command runs every feature; `--run-slow` adds the rest of the combinatorial matrices
# (each method on each family, each method under each objective, ...) and the longer variants of end-to-end
# runs whose features a default test already covers. A test is marked slow only with a comment naming the
# default test that covers what it checks, so the default run (CI) drops no feature, only repetitions.
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (the rest of the full matrices; about a quarter more time)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a repetition of a feature a default test covers; runs with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: a default test covers this feature; --run-slow runs it too")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
