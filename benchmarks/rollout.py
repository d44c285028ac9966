"""Wall time and model calls of block-first, hierarchical (unfused and fused) and pipelined-order rollouts.

    python benchmarks/rollout.py --preset tiny --blocks 8 --repeats 3

All orders run in one process on the same random tiny model, interleaved per repeat (this machine is shared and
noisy: compare the ratios within one run, not absolute numbers across runs). The pipelined order here is single
process, so its speed equals fused-hierarchical; its advantage comes when stages run on separate devices.
"""

from __future__ import annotations

import argparse
import statistics


from hiar.config import add_config_args, config_from_args  # noqa: E402
from hiar.core.demo import run_orders  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = config_from_args(args, parser)
    times: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    for r in range(args.repeats + 1):
        results, _ = run_orders(cfg, args.blocks, seed=0)
        if r == 0:
            continue  # warm-up
        for name, (_, n_calls, secs) in results.items():
            times.setdefault(name, []).append(secs)
            calls[name] = n_calls
    base = statistics.median(times["block_first"])
    print(f"preset={cfg.preset} N={args.blocks} S={cfg.schedule.num_steps} repeats={args.repeats} (median seconds)")
    print(f"{'order':<20}{'calls':>7}{'seconds':>10}{'time / block_first':>20}{'calls / block_first':>21}")
    for name in times:
        med = statistics.median(times[name])
        print(f"{name:<20}{calls[name]:>7}{med:>10.3f}{med / base:>20.2f}{calls[name] / calls['block_first']:>21.2f}")


if __name__ == "__main__":
    main()
