"""Progress reports: the one place gujax and its experiments make a bar.

    from gujax.progress import progress_bar
    for arm in progress_bar(arms, desc="arms"): ...
    with progress_bar(total=n, desc="scattering", unit="img") as bar: bar.update(k)

On a terminal (``sys.stderr.isatty()``) or in a notebook this is a tqdm bar.
Anywhere else (stderr redirected to a file or a pipe, a CI log) a bar would
fill the log with carriage returns and cursor codes, so it is a plain
line instead, ``desc: 3/8 (12 s, about 20 s left)``, written when the bar
has moved and ``PLAIN_INTERVAL`` seconds have passed since its last line, and
once more when it ends: a log gets one line per finished arm or model when
those take longer than that, never a line per step.

``set_enabled(False)`` (the experiments' ``--progress false``) silences
every bar, those of the library (data decoding, scattering, training steps)
included; ``disable=True`` silences one.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable

from tqdm import tqdm as _terminal_tqdm
from tqdm.auto import tqdm as _auto_tqdm

# Seconds between two plain lines of one bar (at most one line per interval).
PLAIN_INTERVAL = 10.0

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every bar on or off (off: ``progress_bar`` returns a silent bar)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether bars are on (``set_enabled``)."""
    return _enabled


@contextlib.contextmanager
def silenced():
    """No bars inside the block; the previous setting afterwards."""
    before = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def _in_notebook() -> bool:
    return _auto_tqdm.__module__.startswith("tqdm.notebook")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class PlainBar:
    """A tqdm-like bar that writes plain lines (no carriage return, no
    cursor codes): when it has moved and ``interval`` seconds have passed
    since its last line, and when it closes. Iterable, a context manager,
    and ``update``, ``set_postfix_str``, ``set_postfix``, ``set_description``,
    ``close`` as in tqdm."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "",
                 total: int | None = None, initial: int = 0, unit: str = "it",
                 interval: float | None = None, file=None):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self._start = initial
        self.postfix = ""
        self.interval = PLAIN_INTERVAL if interval is None else interval
        self._file = file
        self._began = self._last = time.monotonic()
        self._closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        finished = self.total is not None and self.n >= self.total
        if not finished and now - self._last >= self.interval:   # close says finished
            self._write(now)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        # A new stage ("training models 0-5") is worth a line of its own in a log.
        changed = str(text) != self.postfix
        self.postfix = str(text)
        if changed and self.postfix and not self._closed:
            self._write(time.monotonic())

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._write(time.monotonic(), done=True)

    def _line(self, now: float, done: bool) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        elapsed = now - self._began
        when = _duration(elapsed)
        moved = self.n - self._start
        if done:
            when = f"done in {when}" if self.total is None or self.n >= self.total \
                else f"stopped after {when}"
        elif self.total is not None and moved > 0:
            when += f", about {_duration(elapsed / moved * (self.total - self.n))} left"
        head = f"{self.desc}: " if self.desc else ""
        tail = f" [{self.postfix}]" if self.postfix and not done else ""
        unit = f" {self.unit}" if self.unit and self.unit != "it" else ""
        if unit and self.n != 1 and not unit.endswith("s"):
            unit += "s"
        return f"{head}{count}{unit} ({when}){tail}"

    def _write(self, now: float, done: bool = False) -> None:
        self._last = now
        stream = self._file if self._file is not None else sys.stderr
        try:
            stream.write(self._line(now, done) + "\n")
            stream.flush()
        except (OSError, ValueError):           # a closed or broken stream
            pass


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
                 initial: int = 0, unit: str = "it", disable: bool = False,
                 leave: bool = True, file=None, interval: float | None = None):
    """A progress bar over ``iterable`` (or updated by hand, ``total`` known):
    tqdm's on a terminal or in a notebook, a ``PlainBar`` when the stream
    (default stderr) is not a terminal, a silent one with ``disable`` or
    bars turned off (``set_enabled(False)``). ``leave``: a terminal bar
    stays on screen when done (a plain bar always writes its last line)."""
    if disable or not _enabled:
        return _terminal_tqdm(iterable, total=total, initial=initial, disable=True)
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return _terminal_tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit,
                              leave=leave, file=file)
    if file is None and _in_notebook():
        return _auto_tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit,
                          leave=leave)
    return PlainBar(iterable, desc=desc, total=total, initial=initial, unit=unit,
                    interval=interval, file=file)
