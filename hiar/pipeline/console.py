"""What the orchestrator prints: its own ``[full]`` lines and one progress line per stage, drawn from the progress
events of the stage's job (``hiar.platform.progress``). The jobs' own output goes to ``<run_dir>/logs/<stage>.log``,
never here: a whole tiny run used to relay some 11,500 lines of job logs and Ray Data progress bars.

Two ways to draw the progress line:

* live (a terminal, or ``HIAR_PROGRESS=live``): the line is redrawn in place with ``\\r`` and clear-to-end-of-line;
* plain (a file, a CI log, ``HIAR_PROGRESS=plain``): at most one progress line per stage every
  :data:`PLAIN_INTERVAL_S` seconds, and the last one when the stage ends, so a log shows how the stage went without
  a line per event. ``make run`` asks for it: ``ray job submit`` streams the driver's log as text lines, in which a
  carriage return ends a line, so live redraws would arrive as one new line per event.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from hiar.platform.progress import Progress

PROGRESS_ENV = "HIAR_PROGRESS"  # "live" draws in place even when stdout is not a terminal; "plain" never does
PLAIN_INTERVAL_S = 30.0
CLEAR_LINE = "\r\x1b[K"


def is_live(stream) -> bool:
    choice = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if choice in ("live", "plain"):
        return choice == "live"
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_duration(seconds: float) -> str:
    """``4:28``, ``1:02:03``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(rate: float) -> str:
    return f"{rate:.2f}" if rate < 10 else f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


@dataclass(frozen=True)
class _Baseline:
    """The first event of a task in this attempt: the rate is measured from it (a resumed job starts mid-way)."""
    done: int
    at: float


def rate_of(first: _Baseline, event: Progress) -> float | None:
    """Units per second since ``first``; None until there are two distinct points."""
    elapsed = event.at - first.at
    if elapsed <= 0 or event.done <= first.done:
        return None
    return (event.done - first.done) / elapsed


def progress_text(stage: str, event: Progress, rate: float | None, label: str = "full") -> str:
    """``[full] distill: 37/120 steps, 0.31 steps/s, ETA 4:28``; the job's task is named when it does not name the
    stage (``promote (evaluate challenger)``), not when it does (``train distill``)."""
    name = stage if not event.task or stage in event.task.split() else f"{stage} ({event.task})"
    parts = [f"{event.done}/{event.total} {event.unit}" if event.total is not None else f"{event.done} {event.unit}"]
    if rate:
        parts.append(f"{format_rate(rate)} {event.unit}/s")
        if event.total is not None and event.total > event.done:
            parts.append(f"ETA {format_duration((event.total - event.done) / rate)}")
    return f"[{label}] {name}: " + ", ".join(parts)


class StageConsole:
    """The orchestrator's console. ``clock`` (monotonic seconds) decides the plain mode's throttling; the rate and
    ETA come from the events' own timestamps, so they are right however late the events are read."""

    def __init__(self, stream=None, live: bool | None = None, interval: float = PLAIN_INTERVAL_S,
                 clock=time.monotonic, label: str = "full"):
        self.label = label  # the program whose console this is, in front of its lines: ``[full] distill: ...``
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_live(self.stream) if live is None else live
        self.interval, self.clock = interval, clock
        self._drawn = False  # live: a progress line is on screen without its newline
        self._baselines: dict[tuple[str, str], _Baseline] = {}
        self._printed_at: dict[str, float] = {}  # plain: when each stage's last progress line was printed
        self._unprinted: dict[str, str] = {}  # plain: the newest progress line held back by the throttle

    def say(self, text: str, stream=None) -> None:
        """One line of the orchestrator's own (a live progress line is cleared first, then redrawn by the next
        event)."""
        self._clear()
        print(text, file=stream or self.stream, flush=True)

    def progress(self, stage: str, event: Progress) -> str:
        key = (stage, event.task)
        first = self._baselines.setdefault(key, _Baseline(event.done, event.at))
        text = progress_text(stage, event, rate_of(first, event), self.label)
        if self.live:
            self.stream.write(CLEAR_LINE + text)
            self.stream.flush()
            self._drawn = True
            return text
        now = self.clock()
        last = self._printed_at.get(stage)
        if last is None or now - last >= self.interval:
            self._printed_at[stage] = now
            self._unprinted.pop(stage, None)
            print(text, file=self.stream, flush=True)
        else:
            self._unprinted[stage] = text
        return text

    def end_stage(self, stage: str) -> None:
        """The stage's job has ended: its last progress line stays (plain mode prints it if it was held back),
        and the next stage measures its rates afresh."""
        if self.live:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
            self._drawn = False
        elif stage in self._unprinted:
            print(self._unprinted.pop(stage), file=self.stream, flush=True)
        self._printed_at.pop(stage, None)
        for key in [k for k in self._baselines if k[0] == stage]:
            del self._baselines[key]

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()
            self._drawn = False
