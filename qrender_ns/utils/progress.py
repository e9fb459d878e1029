"""Progress bars that may be switched off (--no-progress, tests, non-zero DDP ranks)."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class OptionalProgress:
    """Context manager around `self.bar` (a rich Progress, or None for silence); subclasses build the bar."""

    bar: Optional[object] = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def track(items: Sequence, description: str, enabled: bool = True, eta: bool = False) -> Iterable:
    """Yield the items with a "[q-splat] <description>" bar (count, elapsed, optionally the ETA); plain when off."""
    if not enabled:
        yield from items
        return
    # "\[": a literal bracket (rich would take "[q-splat]" for a markup tag and drop it)
    columns = [TextColumn(r"\[q-splat] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
