"""Progress for every phase that can take more than a few seconds: a bar on a terminal, log lines otherwise.

``Progress(what, total)`` prints a start line at once, then on a terminal a tqdm bar (count, rate,
ETA), and otherwise (a log file, CI, a pipe) one log line at least every ``every`` seconds with the
count, the rate and the ETA, and a final line with the time taken. ``every=None`` leaves the log lines to
the caller (the training loop logs a line per step), and a status line only fills a silence of ``EVERY``
seconds (a slow step). The lines come from a background thread, so they keep coming while one item (a batch
being generated, a judge request, a training step) takes long.

``Heartbeat(what)`` is for one long call that reports nothing itself (converting a GGUF model): the elapsed
time, as a bar on a terminal or a log line every ``every`` seconds from a background thread.

``quiet_third_party()`` turns off the progress bars of transformers, huggingface_hub and datasets ("Loading
weights", "Writing model shards", ...), so they never interleave with dpokit's or land in logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("dpokit")
EVERY = 15.0  # seconds between log lines when stderr is not a terminal (the longest silence, give or take an item)
_DEFAULT: Any = object()


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Count, rate and ETA of a phase; see the module docstring. A background thread refreshes the bar (each
    second) or logs the status line (every ``every`` seconds), so one slow item never means a silence.
    ``enabled=False`` shows nothing (ranks other than 0 under torchrun)."""

    def __init__(self, what: str, total: int | None, unit: str = "it", every: float | None = _DEFAULT,
                 initial: int = 0, enabled: bool = True):
        every = EVERY if every is _DEFAULT else every
        self.what, self.total, self.unit, self.every, self.enabled = what, total, unit, every, enabled
        self.done = self.start_count = initial
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.postfix = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last = self.t0

    _silenced = 0  # > 0 inside ``silenced()``: phases started there show nothing

    def __enter__(self) -> Progress:
        self.t0 = self.last = time.perf_counter()
        if Progress._silenced:
            self.enabled = False
        if not self.enabled:
            return self
        if sys.stderr.isatty():
            self.bar = tqdm(total=self.total, initial=self.done, desc=self.what, unit=self.unit, dynamic_ncols=True,
                            file=sys.stderr)
        elif self.every is not None:
            log.info("%s: %s", self.what, self._start_line())
        interval = 1.0 if self.bar is not None else (self.every or EVERY)
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True, name=self.what)
        self._thread.start()
        return self

    def _beat(self, interval: float) -> None:
        """Refresh the bar, or log the status once ``interval`` seconds passed without a line (with ``every=None``
        the caller's own lines, one per ``update``, count as lines: a status line only fills a silence)."""
        while not self._stop.wait(min(1.0, interval / 4)):
            now = time.perf_counter()
            if now - self.last < interval:
                continue
            self.last = now
            if self.bar is not None:
                self.bar.refresh()
            else:
                log.info("%s: %s", self.what, self.status(now))

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        self.postfix = postfix or self.postfix
        if self.every is None and postfix:  # the caller logged a line (the loop passes its metrics with it)
            self.last = time.perf_counter()
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    @property
    def interactive(self) -> bool:
        return self.bar is not None

    def status(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = now - self.t0
        done = self.done - self.start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.done}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"]
        parts.append(f"{_fmt(elapsed)} elapsed")
        if self.total is not None and rate > 0:
            parts.append(f"ETA {_fmt((self.total - self.done) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self.bar.close()
        elif exc[0] is None and self.every is not None and self.enabled:
            log.info("%s: %s", self.what, self._done_line())

    def _start_line(self) -> str:
        total = f" of {self.total}" if self.total is not None else ""
        return f"starting ({self.done}{total} {self.unit})"

    def _done_line(self) -> str:
        return f"done, {self.status()}"


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Phases started inside show no bar and log no line: short phases that repeat inside one that reports
    (sampling and judging inside every step of ``dpokit rl``)."""
    Progress._silenced += 1
    try:
        yield
    finally:
        Progress._silenced -= 1


class Heartbeat(Progress):
    """Elapsed time of one long call that reports nothing itself: a bar on a terminal, else a log line at the
    start, every ``every`` seconds and at the end."""

    def __init__(self, what: str, every: float = _DEFAULT):
        super().__init__(what, None, unit="", every=every)

    def _start_line(self) -> str:
        return "starting"

    def status(self, now: float | None = None) -> str:
        return f"still working, {_fmt((now or time.perf_counter()) - self.t0)} elapsed"

    def _done_line(self) -> str:
        return f"done in {_fmt(time.perf_counter() - self.t0)}"


def quiet_third_party() -> None:
    """No progress bars from transformers, huggingface_hub or datasets (dpokit shows its own); idempotent."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # child processes, and hub imports still to come
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets reads it when imported (seconds:
    # not imported here for that)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
