"""Stand-in CUDA events for testing the staging bookkeeping on a CPU: each records when it is
recorded on a stream and when it is waited for, into the log of the :class:`Events` that made it.

Example:
    >>> events = Events()
    >>> a, b = events(), events(blocking=True)
    >>> a.record(); b.record(); a.synchronize()
    >>> events.log
    [('record', 1), ('record', 2), ('wait', 1)]
"""

from __future__ import annotations

from typing import Any


class Events:
    """Makes numbered stand-in events (use it in place of ``torch.cuda.Event``); ``log`` is what happened to them."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.count = 0

    def __call__(self, blocking: bool = False) -> Event:
        self.count += 1
        return Event(self, self.count)


class Event:
    def __init__(self, events: Events, n: int) -> None:
        self.events, self.n = events, n

    def record(self, stream: Any = None) -> None:
        self.events.log.append(("record", self.n))

    def synchronize(self) -> None:
        self.events.log.append(("wait", self.n))
