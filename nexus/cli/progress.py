"""Progress of the CLI's long commands (`journal verify`, `journal replay`, `dlq replay`):
count, rate and ETA drawn by rich on stderr.

Drawn only when stderr is a terminal and `--json` is off: a pipe, a log file or a
script reading JSON gets exactly what it got before, and stdout (the command's
result) never carries a progress line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich import filesize
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

REFRESH_PER_SECOND = 8


def wanted(args: Any) -> bool:
    """Progress on a terminal, never with --json or when stderr is not a terminal."""
    return not getattr(args, "json", False) and sys.stderr.isatty()


def _rate(task: Task) -> float | None:
    """Events (or bytes) per second: rich's recent-window speed, else the average so far
    (a task updated once has no window yet)."""
    speed = task.finished_speed or task.speed
    if speed:
        return speed
    elapsed = task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


def _amount(value: float, unit: str) -> str:
    return filesize.decimal(int(value)) if unit == "bytes" else f"{int(value):,}"


class CountColumn(ProgressColumn):
    """`1,234/5,000 events` (or `12.3 MB/64.0 MB` for bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else _amount(task.total, self.unit)
        suffix = "" if self.unit == "bytes" else f" {self.unit}"
        return Text(f"{_amount(task.completed, self.unit)}/{total}{suffix}", style="progress.download")


class RateColumn(ProgressColumn):
    """`523/s` (or `41.9 MB/s`); `-/s` before there is anything to measure."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = _rate(task)
        shown = "-" if rate is None else _amount(rate, self.unit)
        return Text(f"{shown}/s", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """`ETA 0:01:05` from the remaining amount and the rate; `ETA -:--:--` when unknown."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("ETA 0:00:00", style="progress.remaining")
        rate = _rate(task)
        remaining = task.remaining
        if not rate or remaining is None:
            return Text("ETA -:--:--", style="progress.remaining")
        seconds = int(remaining / rate)
        return Text(f"ETA {seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}", style="progress.remaining")


class Tracker:
    """One task's progress; all no-ops when nothing is drawn."""

    def __init__(self, progress: Progress | None, description: str, total: float | None):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        if self.progress is None or self.task is None:
            return
        fields: dict[str, Any] = {"completed": completed}
        if total is not None:
            fields["total"] = total
        if description is not None:
            fields["description"] = description
        self.progress.update(self.task, **fields)


@contextmanager
def track(shown: bool, description: str, total: float | None, unit: str) -> Iterator[Tracker]:
    """A progress line on stderr while the block runs (kept on screen after, with its
    final count) when `shown` (pass `wanted(args)`); else a Tracker that draws nothing."""
    if not shown:
        yield Tracker(None, description, total)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        CountColumn(unit),
        RateColumn(unit),
        EtaColumn(),
        console=Console(file=sys.stderr),
        refresh_per_second=REFRESH_PER_SECOND,
    )
    with progress:
        yield Tracker(progress, description, total)
