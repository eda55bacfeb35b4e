"""The fork server both kill tests drive: torch is imported once, each child is a fork.

Protocol on stdin, one command a line: ``fork [ARG]`` starts ``child(ARG)`` in a forked process
and prints ``pid N``; ``reap N`` waits for it and prints ``signal S`` or ``exit C``.
"""

from __future__ import annotations

import os
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
