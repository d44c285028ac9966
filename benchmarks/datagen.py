"""Data generation: samples/s with 1 and 2 teacher actors (one torch thread each) in one run, their ratio, and
Parquet bytes per sample against the raw fp16 tensor bytes.

    python benchmarks/datagen.py [--count 24] [--teacher hiar/assets/tiny-teacher]

Each configuration runs the real job (hiar/jobs/generate.py) on an in-process local Ray cluster into a fresh
directory. Sampling uses the preset's teacher settings (teacher.num_steps, CFG) unless --steps is given.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(actors: int, count: int, teacher: str, steps: int | None, out: Path) -> float:
    cmd = [sys.executable, "-m", "hiar.jobs.generate", "--preset", "tiny", "--kind", "ode_pairs",
           "--count", str(count), "--output", str(out), "--teacher", teacher, "--actors", str(actors),
           "--set", "data.shard_size=4", "--set", "data.threads_per_actor=1", "--set", "data.cpus_per_actor=0.5",
           "--set", f"run_dir={out.parent / 'run'}"]
    if steps:
        cmd += ["--set", f"teacher.num_steps={steps}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    match = re.search(r"([\d.]+) samples/s", proc.stdout)
    print(f"  {actors} actor(s): {proc.stdout.strip().splitlines()[-1]} (wall {time.monotonic() - t0:.1f} s)")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--teacher", default=str(ROOT / "hiar" / "assets" / "tiny-teacher"))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.count, args.teacher, args.steps, Path(tmp) / "a1")
        two = run(2, args.count, args.teacher, args.steps, Path(tmp) / "a2")
        files = list((Path(tmp) / "a2").glob("shard-*.parquet"))
        stored = sum(f.stat().st_size for f in files)
        raw = args.count * 5 * 12 * 3 * 32 * 32 * 2  # [S+1, F, C, H, W] fp16
    print(f"{'actors':<8}{'samples/s':>12}")
    print(f"{1:<8}{one:>12.3f}\n{2:<8}{two:>12.3f}")
    print(f"2-actor / 1-actor speed-up: {two / one:.2f}x (goal >= 1.8x)")
    print(f"Parquet bytes per sample {stored / args.count:.0f} vs raw fp16 {raw / args.count:.0f}: "
          f"{stored / raw:.3f}x (goal <= 1.05x)")


if __name__ == "__main__":
    main()
