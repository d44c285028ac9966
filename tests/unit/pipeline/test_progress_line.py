"""hiar.pipeline.console: the one progress line per stage the orchestrator draws from a job's progress events."""

from __future__ import annotations

import io

import pytest

from hiar.pipeline.console import CLEAR_LINE, StageConsole, format_duration, is_live, progress_text
from hiar.platform.progress import PREFIX, Progress, parse


def event(done, total=120, at=0.0, task="distill", unit="steps") -> Progress:
    return Progress(task=task, done=done, total=total, unit=unit, at=at)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_line_shows_count_rate_and_eta_measured_from_the_first_event():
    console = StageConsole(io.StringIO(), live=False)
    assert console.progress("distill", event(0, at=1000.0)) == "[full] distill: 0/120 steps"
    # 37 steps in 37 / 0.31 s: 0.31 steps/s, 83 steps left -> 268 s
    assert console.progress("distill", event(37, at=1000.0 + 37 / 0.31)) == \
        "[full] distill: 37/120 steps, 0.31 steps/s, ETA 4:28"


def test_another_program_on_the_same_console_names_itself():
    out = io.StringIO()
    console = StageConsole(out, live=False, label="ablations")
    assert console.progress("distill-next-s0", event(0)) == "[ablations] distill-next-s0 (distill): 0/120 steps"
    console.say(f"[{console.label}] done")
    assert out.getvalue().splitlines() == ["[ablations] distill-next-s0 (distill): 0/120 steps", "[ablations] done"]


def test_a_resumed_job_measures_its_rate_from_where_it_resumed_not_from_zero():
    console = StageConsole(io.StringIO(), live=False)
    console.progress("distill", event(60, at=0.0))
    assert console.progress("distill", event(70, at=10.0)).endswith("70/120 steps, 1.00 steps/s, ETA 0:50")


def test_no_eta_without_a_total_and_the_task_is_named_when_it_does_not_name_the_stage():
    text = progress_text("ode_pairs", event(12, total=None, task="generate ode_pairs", unit="samples"), 2.5)
    assert text == "[full] ode_pairs: 12 samples, 2.50 samples/s"
    text = progress_text("promote", event(1, total=2, task="evaluate challenger", unit="videos"), None)
    assert text == "[full] promote (evaluate challenger): 1/2 videos"


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.6, "1:00"), (268, "4:28"), (3723, "1:02:03")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_plain_mode_prints_at_most_one_line_per_stage_every_30_s_plus_the_last_one():
    out, clock = io.StringIO(), Clock()
    console = StageConsole(out, live=False, clock=clock)
    for now, done in [(0, 0), (10, 10), (20, 20), (31, 31), (45, 45), (50, 50)]:
        clock.now = now
        console.progress("distill", event(done, at=float(now)))
    console.progress("ode_init", event(1, at=50.0, task="ode_init"))  # another stage has its own 30 s
    assert [line.split(":", 1)[1].split(",")[0].strip() for line in out.getvalue().splitlines()] == \
        ["0/120 steps", "31/120 steps", "1/120 steps"]
    console.end_stage("distill")  # the held-back last event is printed once
    console.end_stage("distill")
    assert out.getvalue().splitlines()[-1].startswith("[full] distill: 50/120 steps, 1.00 steps/s")
    assert len(out.getvalue().splitlines()) == 4
    assert "\r" not in out.getvalue()


def test_live_mode_redraws_one_line_in_place_and_ends_it_with_the_stage():
    out = io.StringIO()
    console = StageConsole(out, live=True)
    for done in (1, 2, 3):
        console.progress("distill", event(done, at=float(done)))
    assert out.getvalue().count(CLEAR_LINE) == 3 and "\n" not in out.getvalue()
    console.say("[full] something else")  # clears the progress line before its own
    assert out.getvalue().endswith("3/120 steps, 1.00 steps/s, ETA 1:57" + CLEAR_LINE + "[full] something else\n")
    console.progress("distill", event(4, at=4.0))
    console.end_stage("distill")
    assert out.getvalue().endswith("4/120 steps, 1.00 steps/s, ETA 1:56\n")


def test_live_mode_is_a_terminal_or_hiar_progress_live(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("HIAR_PROGRESS", raising=False)
    assert is_live(Tty()) and not is_live(io.StringIO())
    monkeypatch.setenv("HIAR_PROGRESS", "live")
    assert is_live(io.StringIO())
    monkeypatch.setenv("HIAR_PROGRESS", "plain")
    assert not is_live(Tty())


def test_events_are_found_behind_ray_worker_prefixes():
    line = f"(RayTrainWorker pid=123) {PREFIX}" + '{"task": "distill", "done": 3, "total": 8, "unit": "steps", "at": 5}'
    assert parse(line) == event(3, total=8, at=5)
    assert parse("[train:distill] checkpoint at step 2") is None
