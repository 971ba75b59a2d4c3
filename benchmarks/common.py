"""Shared helpers for the anchoropt benchmarks: class names, model set-up, timing and JSON results.

The benchmarks are not timed tests: they measure side by side in one run, print one summary line per
figure and write ``benchmarks/results/<name>.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# CIFAR-100's 100 fine class names (public dataset labels): realistic lengths of 1-3 BPE tokens.
CLASSNAMES_100 = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
]

# Words put in front of the 100 names when more classes are asked for (fine-grained style: "red fox").
_MODIFIERS = ["small", "large", "red", "black", "wild", "old", "young", "striped", "spotted", "white"]


def classnames(n: int) -> list[str]:
    """``n`` distinct, realistic class names: CIFAR-100's, then ``"<modifier> <name>"`` variants."""
    if n < 1:
        raise ValueError(f"need at least one class, got {n}")
    names = list(CLASSNAMES_100)
    for modifier in _MODIFIERS:
        if len(names) >= n:
            break
        names += [f"{modifier} {name}" for name in CLASSNAMES_100]
    if n > len(names):
        raise ValueError(f"at most {len(names)} class names are available, asked for {n}")
    return names[:n]


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the median is reported")
    p.add_argument("--classes", type=int, default=100, help="number of classes C (default 100)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights and inputs")
    return p


def text_model(device: str, seed: int = 0) -> torch.nn.Module:
    """Random-weight open_clip CLIP with ViT-B/16's text tower, frozen, fp32, on ``device``."""
    from anchoropt.testing import vit_b16_text_clip

    model = vit_b16_text_clip(seed=seed).to(device)
    model.requires_grad_(False)
    return model


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: str,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time of each function: ``warmup`` calls each, then ``repeats`` rounds calling them in turn.

    Interleaving (A B A B ...) spreads drifts of a shared machine's load over all contenders.  ``clock``:
    wall time by default; ``time.process_time`` (this process's CPU time) for single-threaded CPU runs on a
    machine other jobs keep busy (it does not count the time spent waiting for a core).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, args: argparse.Namespace, results: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the arguments, the machine and ``results``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "machine": machine(),
        **results,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def rss_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """Resident memory (MB) before ``fn()`` and its peak while ``fn`` runs (sampled every millisecond)."""
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return before, max(peak[0], rss_mb())


def hidden_help() -> str:
    """``help=`` of an option the benchmark passes to its own subprocesses (not shown in ``--help``)."""
    return argparse.SUPPRESS
