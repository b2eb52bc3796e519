"""Progress of long byte streams, shown to a person and never to a script.

The rule of every ``fleet`` command that moves many bytes (uploading, bundling, verifying): a
bar on standard error while standard error is a terminal, nothing at all otherwise (not even
the label), and nothing in ``--json`` mode. Standard output is never touched, so a pipe or a
script reading it sees the same bytes with or without a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click


def _ignore(_count: int) -> None:
    """The update callable when no bar is drawn."""


@contextmanager
def progress(length: int, label: str, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``update(n)``, which advances a bar of ``length`` bytes by ``n``.

    The bar is drawn on standard error only when ``enabled`` and standard error is a terminal
    (looked up when the bar starts: a test or a caller may have replaced it); otherwise
    ``update`` does nothing.
    """
    stream = sys.stderr
    if not enabled or not stream.isatty():
        yield _ignore
        return
    with click.progressbar(length=length, label=label, file=stream) as bar:
        yield bar.update
