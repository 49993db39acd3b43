"""A stand-in for Google Cloud Storage, for running the CLI on a `gs://` workdir without the network.

`python tests/fake_gcs.py ROOT [jaxft.train flags]` runs `jaxft.train` with every `gs://b/p` that goes
through etils.epath (jaxft's outputs, Orbax's files) and every TensorStore GCS kvstore (Orbax's arrays)
served from ROOT/b/p. jaxft itself runs unchanged: the same code path as on real GCS, where the
backend is gcsfs or TensorFlow's gfile. A write that bypasses epath (a plain `open`, `pathlib`) would
instead create a local `gs:` directory, which the tests look for.
"""

import os
import sys


def install(root: str):
    from etils.epath import testing
    from orbax.checkpoint._src.path import gcs_utils

    def local(p):
        s = os.fspath(p)
        return os.path.join(root, s[len("gs://"):]) if s.startswith("gs://") else s

    def remote(p):
        s = os.fspath(p)
        return "gs://" + os.path.relpath(s, root) if s.startswith(root + os.sep) else s

    def redirect(name):
        def fn(original, *args, **kwargs):
            out = original(*[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kwargs)
            if name == "glob":
                return [remote(p) for p in out]
            if name == "walk":
                return ((remote(top), dirs, files) for top, dirs, files in out)
            return out

        return fn

    names = ("open", "copy", "rename", "exists", "glob", "walk", "isdir", "listdir", "makedirs", "mkdir",
             "remove", "replace", "rmtree", "stat")
    global _MOCK  # held: a dropped context manager would be collected and undo the patch
    _MOCK = testing.mock_epath(**{n: redirect(n) for n in names})
    _MOCK.__enter__()
    gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file", "path": local(path)}
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False


if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's jaxft
    install(os.path.abspath(sys.argv.pop(1)))
    from jaxft.train import run

    run()
