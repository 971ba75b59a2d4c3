"""Table 1's four AnchorOPT rows on one dataset and seed, as a grid runs them: Stage I shared (learned by the first
row, read by the others; ``anchoropt grid``'s default) and Stage I learned by every row, side by side in one run.
Prints the wall time of each, their ratio, each row's Stage I seconds, and checks that all eight runs hold the
same anchors bit for bit and that each row scores the same either way.

    python benchmarks/bench_stage1_sharing.py --data SUITE/toy_pets [--epochs 1] [--seed 1]

``--epochs`` shortens Stage II (the released schedules: 10 to 50 epochs) so that the benchmark runs in minutes;
Stage I runs its full released length.  One torch thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROWS = ("coop+anchoropt", "cocoop+anchoropt", "maple+anchoropt", "dept+anchoropt")


def run(data: Path, output: Path, seed: int, epochs: int) -> tuple[float, dict]:
    """Seconds for the four rows' grid in ``output``, and ``{row: (stage1 record, anchors, results)}``."""
    from anchoropt.io import load_anchors
    from anchoropt.runner import RunConfig
    from anchoropt.runner.grid import plan_grid, run_grid

    base = RunConfig(model="toy-clip", augment="none", epochs=epochs, progress=False, plots=False)
    start = time.perf_counter()
    run_grid(base, list(ROWS), [str(data)], [seed], output, plot=False)
    seconds = time.perf_counter() - start
    rows = {}
    for cell in plan_grid(list(ROWS), [str(data)], [seed], output):
        results = json.loads((cell.run_dir / "results.json").read_text())
        rows[cell.method] = (results["stage1"], load_anchors(cell.run_dir / "anchors.safetensors"),
                             results["results"])
    return seconds, rows


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from anchoropt.runner.stage1_cache import Stage1Cache

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a toy dataset (toyworld make / suite)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1, help="Stage II epochs of every row")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shared_s, shared = run(args.data, Path(tmp) / "shared", args.seed, args.epochs)
        load = Stage1Cache.load
        Stage1Cache.load = lambda self, key: None  # every row learns its own anchors
        try:
            alone_s, alone = run(args.data, Path(tmp) / "alone", args.seed, args.epochs)
        finally:
            Stage1Cache.load = load
    first = shared[ROWS[0]][1]
    same = all(torch.equal(rows[r][1], first) for rows in (shared, alone) for r in ROWS)
    scores = all(shared[r][2] == alone[r][2] for r in ROWS)
    print(f"{args.data.name}, seed {args.seed}, Stage II {args.epochs} epoch(s), 1 thread; Stage I seconds per row:")
    for r in ROWS:
        print(f"  {r:18s} shared {shared[r][0]['seconds']:7.1f} s ({shared[r][0].get('cache')})   "
              f"alone {alone[r][0]['seconds']:7.1f} s")
    print(f"Stage I learned by every row: {alone_s:7.1f} s")
    print(f"Stage I shared:               {shared_s:7.1f} s   ({alone_s / shared_s:.2f}x faster)")
    print(f"anchors identical in all 8 runs: {same}; each row scores the same either way: {scores}")
    return 0 if same and scores else 1


if __name__ == "__main__":
    raise SystemExit(main())
