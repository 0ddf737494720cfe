"""What the predictor's commands share: an argparse type for comma-separated numbers, and the progress bar.

Used by ``predictor.cli`` (``kvscale profile ...``) and by ``predictor.gpu_steps``, which also runs alone on a GPU
box (``python -m predictor.gpu_steps``): so only the standard library at import time, and rich when a bar is shown.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def number_list(convert: Callable[[str], Any], noun: str, minimum: float | None = None) -> Callable[[str], tuple]:
    """An argparse type for comma-separated numbers (``convert``: int or float; ``noun``: what the message calls them).

    ``minimum=None``: at least one value, every one positive ("expected positive integers"). Otherwise every value
    must be ``>= minimum``, and an empty list and a value below the minimum get messages of their own.
    """

    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(x) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {noun}, got {text!r}") from e
        if minimum is None:
            if not values or any(v <= 0 for v in values):
                raise argparse.ArgumentTypeError(f"expected positive {noun}, got {text!r}")
        elif not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        elif any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected {noun} >= {minimum}, got {text!r}")
        return values

    return parse


@contextmanager
def progress_bar(console: Any, start: str, verb: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on ``console``; yields the ``on_progress(done, total, point)`` callback the runners take.

    The bar reads ``start`` until the first report, then ``"{verb} {point}"``. It stops when the block is left,
    also by an exception, so a message printed while handling one comes after the bar.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task(start, total=None)

        def on_progress(done: int, total: int, point: str) -> None:
            progress.update(task, completed=done, total=total, description=f"{verb} {point}".strip())

        yield on_progress
