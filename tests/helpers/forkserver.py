"""The fork server both kill tests drive: torch is imported once, each child is a fork.

Protocol on stdin, one command a line: ``fork [ARG]`` starts ``child(ARG)`` in a forked process
and prints ``pid N``; ``reap N`` waits for it and prints ``signal S`` or ``exit C``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable


def serve(child: Callable[[str | None], None]) -> None:
    for line in sys.stdin:
        cmd, *rest = line.split()
        arg = rest[0] if rest else None
        if cmd == "fork":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    child(arg)
                except BaseException as e:
                    print(f"child error {e!r}", file=sys.stderr, flush=True)
                    code = 1
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(rest[0]), 0)
            if os.WIFSIGNALED(status):
                print(f"signal {os.WTERMSIG(status)}", flush=True)
            else:
                print(f"exit {os.WEXITSTATUS(status)}", flush=True)


class ForkClient:
    """The test side: start ``python SCRIPT ARGS...`` (a program that calls :func:`serve` after printing
    a ``ready ...`` line), then ``ask("fork ...")`` / ``ask("reap PID")``. A context manager."""

    def __init__(self, script: object, *args: object, env: dict[str, str] | None = None, stderr: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *(str(a) for a in args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr else None,
            text=True,
            bufsize=1,
            env=env,
        )
        self.ready = self.reply()
        assert self.ready.split()[0] == "ready", self.ready

    def reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the fork server died (rc={self.proc.returncode}):\n{err}")
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> ForkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
