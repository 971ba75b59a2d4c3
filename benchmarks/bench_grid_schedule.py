"""How long a finished grid takes with ``--jobs N`` in the plan's order and longest first (``anchoropt grid``'s
order): every run's measured seconds (its ``results.json``) replayed through N workers, each taking the next run
when it is free.  Side by side, from the same measured durations; prints the makespans, their ratio, and the ideal
(total / N, or the longest run if that is longer).

    python benchmarks/bench_grid_schedule.py GRID [--jobs 2]    # GRID: a finished `anchoropt grid` / table1 output

The replay leaves out what every order shares (the feature pass before the runs, process start-up).
"""

from __future__ import annotations

import argparse
import heapq
import json
from pathlib import Path
from typing import Sequence


def makespan(durations: Sequence[float], jobs: int) -> float:
    """Seconds until the last of ``durations`` ends when ``jobs`` workers take them in this order."""
    free = [0.0] * jobs
    for seconds in durations:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def main(argv: Sequence[str] | None = None) -> int:
    from anchoropt.runner import RunConfig, grid
    from anchoropt.runner.schedule import estimated_work, longest_first

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    spec = json.loads((args.grid / grid.GRID_FILE).read_text())
    runs = grid.plan_grid(spec["methods"], spec["data"], spec["seeds"], args.grid)
    seconds, work = {}, {}
    for run in runs:
        results = run.run_dir / "results.json"
        if not results.is_file():
            raise SystemExit(f"{run.name} has not finished ({results} is missing): replay a finished grid")
        seconds[run] = json.loads(results.read_text())["seconds"]
        work[run] = estimated_work(RunConfig.from_json(json.loads((run.run_dir / "run_config.json").read_text())))
    planned = makespan([seconds[r] for r in runs], args.jobs)
    lpt = makespan([seconds[r] for r in longest_first(runs, work.__getitem__)], args.jobs)
    ideal = max(sum(seconds.values()) / args.jobs, max(seconds.values()))
    print(f"{len(runs)} runs, {sum(seconds.values()):.0f} s of runs, --jobs {args.jobs}")
    print(f"plan order:    {planned:7.0f} s")
    print(f"longest first: {lpt:7.0f} s   ({planned / lpt:.2f}x faster than the plan order)")
    print(f"ideal:         {ideal:7.0f} s   (longest first is {lpt / ideal:.3f}x the ideal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
