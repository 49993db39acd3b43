"""`python -m jaxft.MODULE ARGS` for the tests without paying its imports each time.

A CLI run in the tests spends 2-3 s of its 5-8 s importing JAX, Flax, Optax, Orbax and TensorBoard. A fork
server imports them once, in a clean process with the run's environment and working directory (JAX reads its
settings from the environment at import), then forks a child per run. The child is what
`python -m jaxft.MODULE ARGS` would be: its own process, fds 0/1/2 on /dev/null and two files, the module run
as `__main__` with that argv (jaxft.train, which the server imported, through its `run()`), the exit status a
real interpreter gives (an uncaught exception prints its traceback and exits 1), and its atexit handlers run
on the way out. JAX's backend is never started in the server (checked before each fork), so no device state
or XLA thread is shared; each child starts its own.

`JAXFT_TEST_FORK=0` turns it off: every run a new interpreter. Runs that signal or watch a process
(`test_train.cli(wait=False)`) and the multi-process runs always start a real one.
"""

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the CLIs import, so that a child finds it in sys.modules. A module missing here only costs its import in
# each child; one that started a thread at import would make forking unsafe (checked). Not the CLI modules run
# as __main__ (jaxft.evaluate, generate, plan): runpy warns on stderr when the module is already imported.
SERVER = r"""
import json, os, runpy, sys, threading, traceback
import jaxft.train
import flax.linen, optax, orbax.checkpoint, etils.epath, tqdm, safetensors.numpy
import jaxft.checkpoint, jaxft.metrics, jaxft.step, jaxft.objectives, jaxft.peft, jaxft.models.family, jaxft.hf
import jaxft.models.llama, jaxft.models.gpt2, jaxft.models.bert, jaxft.models.t5, jaxft.peft.hf_peft, jaxft.tokenizer
import jaxft.data.tasks, jaxft.data.mixture, jaxft.data.seq2seq, jaxft.data.iterator, jaxft.flops, jaxft.storage
from tensorboard.summary.writer.record_writer import RecordWriter
from jax._src import xla_bridge

requests, replies = os.fdopen(0, "r"), os.fdopen(1, "w")
replies.write("ready\n"); replies.flush()
for line in requests:
    job = json.loads(line)
    assert not xla_bridge._backends and threading.active_count() == 1, "the fork server must stay single-threaded"
    pid = os.fork()
    if pid == 0:
        requests.close(); replies.close()
        null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
        for fd, path in ((1, job["out"]), (2, job["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.dup2(f, fd); os.close(f)
        sys.argv = job["argv"]
        os.environ.clear(); os.environ.update(job["env"])  # what differs is read after import (VOLATILE)
        code = 0
        try:
            if job["module"] == "jaxft.train":
                jaxft.train.run()
            else:
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.exit(code)  # the interpreter's own exit: atexit handlers, threads joined, stdio flushed
    replies.write(f"{pid}\n"); replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write(f"{os.waitstatus_to_exitcode(status)}\n"); replies.flush()
"""

_servers = {}  # (environment, cwd) -> the Popen of its server, least recently used first
MAX_SERVERS = 3


def enabled() -> bool:
    return os.environ.get("JAXFT_TEST_FORK", "1") != "0"


# Set per test by pytest: a server's environment may differ from its child's only in these.
VOLATILE = ("PYTEST_CURRENT_TEST",)


def _server(env, cwd):
    key = (frozenset((k, v) for k, v in env.items() if k not in VOLATILE), str(cwd))
    server = _servers.pop(key, None)
    if server is None or server.poll() is not None:
        while len(_servers) >= MAX_SERVERS:
            _stop(_servers.pop(next(iter(_servers))))
        server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the tests' fork server did not start")
    _servers[key] = server
    return server


def _stop(server):
    server.stdin.close()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


atexit.register(lambda: [_stop(s) for s in _servers.values()])


def python_m(module, *args, env=None, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    """`python -m module *args` as `subprocess.run(..., capture_output=True, text=True)` returns it."""
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if not enabled():
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    server = _server(env, cwd)
    with tempfile.TemporaryDirectory(prefix="jaxft-fork-") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        argv = [str(ROOT.joinpath(*module.split("."))) + ".py", *cmd[3:]]
        server.stdin.write(json.dumps({"module": module, "argv": argv, "env": env, "out": out, "err": err}) + "\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        killed = []

        def kill():  # as subprocess.run's timeout does; the child may have just exited
            killed.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            code = int(server.stdout.readline())
        finally:
            timer.cancel()
        if killed:
            raise subprocess.TimeoutExpired(cmd, timeout)
        with open(out, encoding="utf-8", errors="replace") as f, open(err, encoding="utf-8", errors="replace") as g:
            return subprocess.CompletedProcess(cmd, code, f.read(), g.read())
