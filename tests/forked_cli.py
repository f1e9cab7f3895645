"""The command line as a process of its own, without paying its imports on every call.

A command that touches a model spends about 8 s importing torch, diffusers and transformers
before it does anything; the suite runs the command line some forty times. ``run_cli`` forks
each command from one long-lived process that has already imported them and runs it as
``python -m diffmem.cli`` would (``runpy``, a fresh ``__main__``), so every command still has a
process of its own (its exit code, stdout, stderr, warnings, atexit handlers, working directory
and environment), only without the import. A command given an ``env`` of its own runs
as a plain subprocess, since libraries read some variables once, at import. Set
``DIFFMEM_TEST_SUBPROCESS=1`` to run every command as a plain ``python -m diffmem.cli``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

PLAIN = [sys.executable, "-m", "diffmem.cli"]

# The parent imports, then serves one request a line: it forks, and the child runs the command
# with its output in the files asked for. The parent answers with the child's pid, then its exit code.
_SERVER = r"""
import atexit, json, os, runpy, sys, traceback
from diffmem import cli
cli.quiet_library_environment()
from diffusers import StableDiffusionPipeline  # noqa: F401 (the import that costs: torch, diffusers, transformers' CLIP)
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = ["diffmem", *request["args"]]
            sys.modules.pop("diffmem.cli")  # run as python -m runs it: a fresh __main__, found by click's usage line
            try:
                runpy.run_module("diffmem.cli", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class _Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)
        self.pending = b""
        if self._line(timeout=180) != "ready":
            raise RuntimeError("the forking command-line server did not start")

    def _line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the forking command-line server exited ({self.proc.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = {"args": args, "stdout": out, "stderr": err, "cwd": os.getcwd(), "env": dict(os.environ)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = int(self._line(timeout=60))
            answer = self._line(timeout)
            if answer is None:
                os.kill(pid, signal.SIGKILL)
                self._line(timeout=60)
                raise subprocess.TimeoutExpired([*PLAIN, *args], timeout)
            with open(out) as o, open(err) as e:
                return subprocess.CompletedProcess([*PLAIN, *args], int(answer), o.read(), e.read())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


_server: _Server | None = None


def run_cli(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``diffmem ARGS`` in a process of its own; stdout and stderr as text, like ``subprocess.run``."""
    global _server
    args = [str(a) for a in args]
    if env is not None or os.environ.get("DIFFMEM_TEST_SUBPROCESS") == "1":
        return subprocess.run([*PLAIN, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    if _server is None:
        _server = _Server()
        atexit.register(_server.close)
    return _server.run(args, timeout)
