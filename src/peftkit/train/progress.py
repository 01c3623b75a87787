"""Console output for long jobs: a tqdm bar on a terminal, plain lines elsewhere.

- On a terminal (stdout and stderr both TTYs): a tqdm bar on stderr.
- Otherwise (a pipe, a log file, CI): a plain line every tenth of the job.
- ``quiet``: no progress at all, and only the lines marked essential.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click


class Progress:
    """Counts steps of one job; shows a bar, prints periodic lines, or stays silent."""

    def __init__(self, total: int, desc: str, mode: str, echo, lines: bool = True, on_close=None) -> None:
        self.total, self.desc, self.mode, self.echo = total, desc, mode, echo
        self.done = 0
        self.started = time.monotonic()
        self.every = max(1, total // 10)
        self.lines = lines
        self.on_close = on_close
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int = 1, **stats: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix({k: _fmt(v) for k, v in stats.items()}, refresh=False)
        elif self.mode == "lines" and self.lines and (self.done % self.every == 0 or self.done == self.total):
            elapsed = time.monotonic() - self.started
            extra = "".join(f" {k} {_fmt(v)}" for k, v in stats.items())
            self.echo(f"{self.desc} {self.done}/{self.total}{extra} [{elapsed:.1f}s]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if self.on_close is not None:
                self.on_close(self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}"
    return str(value)


class Console:
    """Where a command's lines go. ``to_stderr`` keeps stdout for a machine-readable result."""

    def __init__(self, quiet: bool = False, to_stderr: bool = False, silent: bool = False) -> None:
        """``silent``: nothing at all (the processes other than rank 0 of a distributed run)."""
        self.quiet = quiet or silent
        self.silent = silent
        self.to_stderr = to_stderr
        self._bars: list[Progress] = []

    def _echo(self, msg: str) -> None:
        if self._bars:  # print above the bars instead of through them
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr if self.to_stderr else sys.stdout)
        else:
            click.echo(msg, err=self.to_stderr)

    def essential(self, msg: str) -> None:
        """A line shown even with ``--quiet`` (where output goes, the headline numbers)."""
        if not self.silent:
            self._echo(msg)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self._echo(msg)

    def mode(self) -> str:
        if self.quiet:
            return "off"
        return "bar" if _isatty(sys.stdout) and _isatty(sys.stderr) else "lines"

    def progress(self, total: int, desc: str, lines: bool = True) -> Progress:
        bar = Progress(total, desc, self.mode(), self.info, lines=lines, on_close=self._bars.remove)
        if bar.bar is not None:
            self._bars.append(bar)
        return bar


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
