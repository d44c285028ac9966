"""Progress of long work, as events a job prints and the orchestrator draws as one live line per stage.

A job calls :func:`report` as it goes (``done`` of ``total`` units). Each call prints one line on stdout that
starts with :data:`PREFIX` and carries a JSON event; a job run by hand shows those lines as they are (readable,
and at most one every ``min_interval`` seconds per task), and ``hiar.pipeline`` reads them from the child's output
(:func:`parse`) and redraws a single line per stage instead of relaying the job's whole log.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

PREFIX = "@hiar-progress "


@dataclass(frozen=True)
class Progress:
    task: str  # what is being done, e.g. "generate ode_pairs", "distill"
    done: int
    total: int | None
    unit: str  # "samples", "steps", "videos", ...
    at: float  # time.time() when reported


_last: dict[str, float] = {}


def report(task: str, done: int, total: int | None, unit: str, *, min_interval: float = 2.0, stream=None) -> None:
    """Print a progress event; calls closer than ``min_interval`` seconds for the same task are dropped, except the
    first and the last (``done == total``)."""
    now = time.time()
    final = total is not None and done >= total
    if not final and task in _last and now - _last[task] < min_interval:
        return
    _last[task] = now
    event = Progress(task=task, done=int(done), total=None if total is None else int(total), unit=unit, at=now)
    print(PREFIX + json.dumps(asdict(event)), file=stream or sys.stdout, flush=True)


def parse(line: str) -> Progress | None:
    """The event on a line printed by :func:`report`, or None for any other line. The prefix may stand after
    other text: Ray puts ``(RayTrainWorker pid=...)`` in front of what a worker prints."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        return Progress(**json.loads(line[at + len(PREFIX):]))
    except (ValueError, TypeError):
        return None
