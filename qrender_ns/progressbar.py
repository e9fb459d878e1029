"""A rich progress bar that may be switched off (--no-progress, non-zero DDP ranks): `bar` is None then."""

from __future__ import annotations

from typing import Optional


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
