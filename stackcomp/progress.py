"""Progress reporting that passes and the training loop share.

The engine hands every stage a :class:`Progress`; code that runs long calls
``with progress.bar("STF epoch 1", total=n) as bar: ... bar.advance(loss=0.31)``. Outside
the engine (tests, notebooks) :data:`NULL_PROGRESS` does nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol


class Bar(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...


class Progress(Protocol):
    def bar(self, description: str, total: int | None) -> Any: ...


class _NullBar:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass


class _NullProgress:
    @contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[Bar]:
        yield _NullBar()


NULL_PROGRESS: Progress = _NullProgress()


class RichProgress:
    """Bars inside a live ``rich.progress.Progress`` owned by the engine."""

    def __init__(self, progress: Any, indent: int = 1):
        self._progress = progress
        self._indent = indent

    @contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[Bar]:
        task = self._progress.add_task("  " * self._indent + description, total=total, info="")
        progress = self._progress

        class _Bar:
            def advance(self, n: int = 1, **fields: Any) -> None:
                info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                progress.update(task, advance=n, **({"info": info} if fields else {}))

        try:
            yield _Bar()
        finally:
            progress.remove_task(task)


class ReportingProgress:
    """Bars reported to a callback as ``[(description, done, total, info), ...]`` (the stage's
    open bars), at most every ``every`` seconds and whenever a bar opens or closes: how a stage
    running elsewhere (a Ray worker) shows its step counts in the driver's view."""

    def __init__(self, report: Any, every: float = 1.0):
        self._report = report
        self._every = every
        self._bars: dict[int, list[Any]] = {}
        self._last = 0.0

    def _send(self, force: bool = False) -> None:
        import time

        now = time.monotonic()
        if force or now - self._last >= self._every:
            self._last = now
            self._report([tuple(b) for b in self._bars.values()])

    @contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[Bar]:
        row = [description, 0, total, ""]
        self._bars[id(row)] = row
        owner = self

        class _Bar:
            def advance(self, n: int = 1, **fields: Any) -> None:
                row[1] += n
                if fields:
                    row[3] = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                owner._send()

        self._send(force=True)
        try:
            yield _Bar()
        finally:
            self._bars.pop(id(row), None)
            self._send(force=True)
