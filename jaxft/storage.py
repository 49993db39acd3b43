"""Where a run's outputs go: local directories or any `etils.epath` URL (`gs://bucket/run`, `s3://...`).

Checkpoints, TensorBoard events, metrics.jsonl and exports all go through `epath.Path`, so a local
run and a cloud run share one code path; only the backend behind the path differs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from etils import epath

from jaxft.errors import JaxftError

# The fsspec package each URL scheme needs when TensorFlow's gfile is not installed.
BACKENDS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


def user_cache() -> Path:
    """Where jaxft keeps what it can rebuild (tokenized data, compiled programs): $JAXFT_CACHE, else
    ~/.cache/jaxft."""
    return Path(os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft")


def path(location: str, key: str = "workdir") -> epath.Path:
    """An absolute local path, or a URL whose filesystem backend is installed (one-line error if not)."""
    location = str(location)
    if "://" not in location:
        return epath.Path(os.path.abspath(location))
    scheme = location.split("://", 1)[0]
    try:
        p = epath.Path(location)
        p.exists()  # the backend is imported on first use
    except (ImportError, KeyError, NotImplementedError):
        hint = f"pip install {BACKENDS[scheme]}" if scheme in BACKENDS else f"supported: {', '.join(BACKENDS)}"
        raise JaxftError(f"{key}={location}: no filesystem for {scheme}:// paths is installed ({hint})") from None
    return p


def check_writable_dir(p: epath.Path, key: str) -> None:
    """A local output directory whose path runs into an existing file is one error before anything is written."""
    if not is_local(p):
        return
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise JaxftError(f"{key}={p}: {q} is a file, expected a directory (or a path that does not exist)")
            if not os.access(q, os.W_OK | os.X_OK):
                raise JaxftError(f"{key}={p}: {q} is not writable")
            return


def make_dir(p: epath.Path, key: str) -> None:
    """`p.mkdir`, a directory that cannot be made (a read-only or special file system) one line."""
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JaxftError(f"{key}={p}: cannot be created ({e.strerror or e})") from None


def is_local(p: epath.Path) -> bool:
    return "://" not in os.fspath(p)


@contextmanager
def local_dir(target: epath.Path):
    """A local directory to write into; copied to `target` afterwards when `target` is remote.

    For writers that only take local files (safetensors, tokenizer copies)."""
    if is_local(target):
        target.mkdir(parents=True, exist_ok=True)
        yield str(target)
        return
    tmp = tempfile.mkdtemp(prefix="jaxft-export-")
    try:
        yield tmp
        copy_tree(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tree(src: str, target: epath.Path):
    for root, _, files in os.walk(src):
        dest = target / os.path.relpath(root, src) if root != src else target
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            (dest / name).write_bytes(open(os.path.join(root, name), "rb").read())
