"""AnchorOPT end to end: Stage I anchors -> Stage II prompts -> base / novel accuracy and harmonic mean.

Offline default: the toy world (``anchoropt.toyworld``) with its shipped pretrained toy CLIP - zero-shot
accuracy first, then AnchorOPT's base / novel / HM; toy-world figures, meaningful inside the toy world and
not comparable with the paper's::

    anchoropt demo                     # or: python -m anchoropt demo, python examples/quickstart.py
    anchoropt demo --random            # the tiny random-weight tower on synthetic images (means nothing)

The real thing (an open_clip model, an ImageFolder dataset, a {class: [sentences]} descriptions JSON)::

    anchoropt demo --model ViT-B-16 --pretrained openai \\
        --data path/to/imagefolder --descriptions path/to/descriptions.json --save runs/quickstart

Classes are sorted as ImageFolder sorts them; the first ceil(C/2) are the base classes (trained on, K shots
each), the rest the novel classes (never seen), as in Dassl's base-to-novel protocol.  For full experiments
(split files, presets, cross-dataset and domain generalisation) use the runner: ``anchoropt train --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import anchoropt
import anchoropt.datasets.folders
from anchoropt.testing import tiny_open_clip
from anchoropt.functional import anchoropt_loss

__all__ = ["main", "run", "add_arguments"]

RANDOM_NOTE = ("NOTE: RANDOM WEIGHTS + synthetic data: this runs the code path; the accuracy below means "
               "NOTHING.")

# Synthetic world: CIFAR-10 class names, each with a few made-up facts for the descriptions.
FACTS = {
    "airplane": ["has two long wings", "flies high in the sky", "has a metal body and jet engines"],
    "automobile": ["has four wheels", "drives on roads", "has doors and glass windows"],
    "bird": ["has feathers and a beak", "can fly", "sits on tree branches"],
    "cat": ["is a small furry pet", "has whiskers and pointed ears", "likes to sleep in the sun"],
    "deer": ["has antlers", "lives in forests", "has long thin legs"],
    "dog": ["is a loyal pet", "wags its tail", "has a wet nose and floppy ears"],
    "frog": ["is a green amphibian", "lives near ponds", "jumps with strong back legs"],
    "horse": ["has a long mane", "can gallop fast", "has hooves"],
    "ship": ["floats on water", "carries cargo across the sea", "has a large hull"],
    "truck": ["has a large cargo bed", "carries heavy loads", "has big wheels"],
}


def synthetic_descriptions(classes: list[str]) -> dict[str, list[str]]:
    """``{class: [sentences]}`` in the CuPL JSON format, a few sentences per class."""
    def article(word: str) -> str:
        return "an" if word[0] in "aeiou" else "a"

    return {
        c: [f"A photo of {article(c)} {c}, which {fact}." for fact in FACTS[c]]
        + [f"{article(c).capitalize()} {c} {FACTS[c][0]} and {FACTS[c][1]}."]
        for c in classes
    }


def synthetic_images(n_per_class: int, n_classes: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """Noisy ``size x size`` images, one colour and one pattern per class, CLIP-normalised."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r2 = (xx - size / 2) ** 2 + (yy - size / 2) ** 2
    patterns = [(yy // 4) % 2, (xx // 4) % 2, (yy // 4 + xx // 4) % 2, ((xx + yy) // 4) % 2, r2 < (size / 3) ** 2,
                (abs(xx - size / 2) < 3) | (abs(yy - size / 2) < 3), xx / size, yy / size,
                (xx % 6 < 2) & (yy % 6 < 2), r2 > (size / 3) ** 2]
    colours = torch.rand(n_classes, 3, 1, 1, generator=g)
    images, labels = [], []
    for c in range(n_classes):
        mask = patterns[c % len(patterns)].float()
        for _ in range(n_per_class):
            shift = torch.randint(-3, 4, (2,), generator=g).tolist()
            img = colours[c] * mask.roll(shift, dims=(0, 1)) + 0.2 * torch.randn(3, size, size, generator=g)
            images.append(img.clamp(0, 1))
            labels.append(c)
    mean, std = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None], torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    return TensorDataset((torch.stack(images) - mean) / std, torch.tensor(labels))


TOY_NOTE = ("NOTE: toy-world figures (procedural images, a small CLIP pretrained on them; docs/toyworld.md): "
            "meaningful inside the toy world, not comparable with the paper's.")


def toy_setup(args):
    """The toy world: the first ``args.toy_classes`` classes of the suite dataset ``args.toy_dataset`` (in its
    style) written to a temporary directory - 16 training and 25 test images a class - and the shipped toy CLIP."""
    import tempfile

    from anchoropt.toyworld import load_model
    from anchoropt.toyworld.make import make
    from anchoropt.toyworld.suite import SUITE, suite_concepts

    spec = {d.name: d for d in SUITE}[args.toy_dataset]
    model, preprocess, tokenizer = load_model()
    with tempfile.TemporaryDirectory(prefix="anchoropt-toyworld-") as root:
        make(root, seed=args.seed, concepts=suite_concepts(spec)[: args.toy_classes], domain=spec.domain,
             sizes={"train": args.shots, "val": 1, "test": 25})
        dataset = anchoropt.datasets.folders.open_dataset(root)
        records = dataset.train + dataset.test
        images = anchoropt.datasets.folders.ImageDataset(records, preprocess)
        tensors = TensorDataset(torch.stack([images[i][0] for i in range(len(images))]),
                                torch.tensor([r.label for r in records]))
        descriptions = json.loads(Path(root, "descriptions.json").read_text(encoding="utf-8"))
    print(f"toy dataset: {spec.name} ({spec.mirrors}-like: {spec.kind}; style '{spec.domain}', which the hand "
          "prompt 'a photo of a {class}.' does not name)")
    labels = tensors.tensors[1].tolist()
    return model, tokenizer, dataset.classnames, tensors, tensors, labels, descriptions


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, classnames, dataset, label_offset: int, args) -> float:
    """Top-1 accuracy (%) of the hand prompt "a photo of a {class}." on ``dataset``."""
    from anchoropt.toyworld.zeroshot import class_text_features

    texts = class_text_features(model, tokenizer, classnames).to(args.device)
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=256):
        logits = image_features(model, images.to(args.device)) @ texts.T
        correct += int((logits.argmax(-1).cpu() == labels - label_offset).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def load_setup(args):
    """Model, tokenizer, sorted class names, train / test datasets (same indexing), labels, descriptions."""
    if args.model is None and not args.random:
        return toy_setup(args)
    if args.model is None:
        model = tiny_open_clip(image_size=32, seed=args.seed)
        classes = sorted(FACTS)
        data = synthetic_images(24, len(classes), seed=args.seed)
        return model, None, classes, data, data, data.tensors[1].tolist(), synthetic_descriptions(classes)
    from torchvision.datasets import ImageFolder

    from anchoropt.runner.models import build_model

    if args.data is None or args.descriptions is None:
        raise SystemExit("--model needs --data (an ImageFolder directory) and --descriptions (a JSON file)")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"dataset directory not found: {args.data} (--data)")
    # the runner's loader: model-name suggestions, a one-line error at once when a tag cannot be downloaded
    bundle = build_model(args.model, args.pretrained, args.device)
    train_set, test_set = ImageFolder(args.data, bundle.train_transform), ImageFolder(args.data, bundle.test_transform)
    return bundle.model, bundle.tokenizer, train_set.classes, train_set, test_set, train_set.targets, args.descriptions


def few_shot_split(labels: list[int], n_base: int, shots: int, seed: int):
    """K random images per base class for training; the other base images and all novel images for testing."""
    rng = random.Random(seed)
    train = []
    for c in range(n_base):
        members = [i for i, y in enumerate(labels) if y == c]
        train += rng.sample(members, min(shots, len(members)))
    chosen = set(train)
    base_test = [i for i, y in enumerate(labels) if y < n_base and i not in chosen]
    novel_test = [i for i, y in enumerate(labels) if y >= n_base]
    return train, base_test, novel_test


@torch.no_grad()
def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """Frozen image tower: L2-normalised features ``(B, E)``."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


@torch.no_grad()
def encoded(model, dataset, args) -> TensorDataset:
    """The frozen image tower's features of ``dataset``, once: ``(N, E)`` features and ``(N,)`` labels."""
    feats, labels = [], []
    for images, y in DataLoader(dataset, batch_size=256, num_workers=args.workers):
        feats.append(image_features(model, images.to(args.device)).cpu())
        labels.append(y)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def train_prompts(learner, model, loader: DataLoader, epochs: int, loss_fn, args, name: str) -> None:
    """``loader`` yields frozen image features and labels; the learner's trainable tensors with SGD (lr ``args.lr``, momentum 0.9, wd 5e-4), cosine decay per step;
    ``loss_fn(learner output, labels)``."""
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    learner.train()
    first = last = None
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for features, labels in loader:
            labels = labels.to(args.device)
            loss = loss_fn(learner(features.to(args.device)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
        last = total / seen
        first = last if first is None else first
    print(f"  {name}: {epochs} epochs, loss {first:.4f} -> {last:.4f}")


def anchoropt_objective(args):
    """AnchorOPT's Stage II loss on the learner's ``(normal, anchor)`` logits, with the demo's weights."""
    return lambda outputs, labels: anchoropt_loss(outputs[0], outputs[1], labels, args.ce_weight, args.kd_weight,
                                                  args.kd_temperature, args.kd_normalization)


@torch.no_grad()
def accuracy(learner, model, dataset, mode: str | None, label_offset: int, args) -> float:
    """Top-1 accuracy (%) on ``dataset`` with ``learner.predict(..., mode=mode)`` (``mode=None``: the learner's
    own logits, a CoOp context)."""
    learner.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=100, num_workers=args.workers):
        feats = image_features(model, images.to(args.device))
        logits = learner(feats) if mode is None else learner.predict(feats, mode=mode)
        correct += int((logits.argmax(-1).cpu() == labels - label_offset).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def save(anchors: torch.Tensor, learner, base: list[str], directory: str) -> None:
    """Stage I anchors and the Stage II learner as safetensors + JSON (anchoropt.io)."""
    from anchoropt import io

    io.save_anchors(anchors, f"{directory}/anchors.safetensors", classnames=base)
    io.save_prompt_learner(learner, f"{directory}/prompt_learner")
    print(f"saved anchors and prompt learner to {directory}/ (reload: anchoropt.prompts.load_prompt_learner)")


def run(args: argparse.Namespace) -> int:
    """The demo for parsed arguments (:func:`add_arguments`); returns the exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    synthetic = args.model is None and args.random
    toy = args.model is None and not args.random
    if synthetic:
        print(RANDOM_NOTE)
    elif toy:
        print(TOY_NOTE)
    elif args.pretrained in (None, "none"):
        print(f"NOTE: {args.model} with RANDOM weights (no --pretrained): the accuracy means nothing.")
    start = time.perf_counter()
    model, tokenizer, classes, train_set, test_set, labels, descriptions = load_setup(args)
    model = model.to(args.device).requires_grad_(False)
    n_base = len(anchoropt.datasets.folders.base_novel_split(len(classes))[0])  # first ceil(C/2) classes, as Dassl
    base, novel = classes[:n_base], classes[n_base:]
    train_idx, base_idx, novel_idx = few_shot_split(labels, n_base, args.shots, args.seed)
    listed = (lambda names: f"{names[:4]} ..." if len(names) > 6 else names)
    print(f"{len(classes)} classes: base {listed(base)}, novel {listed(novel)}; {len(train_idx)} training images "
          f"({args.shots} shots), {len(base_idx)} base / {len(novel_idx)} novel test images")
    rows = {}
    if toy:
        rows["zero-shot"] = (zero_shot_accuracy(model, tokenizer, base, Subset(test_set, base_idx), 0, args),
                             zero_shot_accuracy(model, tokenizer, novel, Subset(test_set, novel_idx), n_base, args))
        _print_row("zero-shot ('a photo of a {class}.')", rows["zero-shot"])
    loader = DataLoader(encoded(model, Subset(train_set, train_idx), args), batch_size=args.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(args.seed))

    from anchoropt.methods.baselines import SoftPromptLearner

    coop = SoftPromptLearner(model, base, n_soft=args.coop_n_soft, tokenizer=tokenizer)
    train_prompts(coop, model, loader, args.coop_epochs, F.cross_entropy, args, f"CoOp (M={args.coop_n_soft}, CE)")
    rows["CoOp"] = _base_novel(coop, model, test_set, base_idx, novel_idx, base, novel, n_base, None, args)
    _print_row("CoOp", rows["CoOp"])

    stage1 = anchoropt.AnchorLearner(model, base, n_anchor=1, tokenizer=tokenizer)
    history = stage1.fit(descriptions, steps=args.stage1_steps, progress=False)
    print(f"Stage I: {args.stage1_steps} steps, description MSE loss {history[0]:.4f} -> {history[-1]:.4f}")
    learner = anchoropt.AnchorOPTPromptLearner(
        model, base, stage1.frozen_anchors(), n_soft=args.n_soft, tokenizer=tokenizer
    )
    train_prompts(learner, model, loader, args.epochs, anchoropt_objective(args), args,
                  f"CoOp+AnchorOPT (M={args.n_soft}, CE {args.ce_weight:g} + KD {args.kd_weight:g}, "
                  f"{args.kd_normalization} KL)")
    print(f"learned arrangement (slot -> token): {learner.position.describe()}")
    rows["CoOp+AnchorOPT"] = _base_novel(learner, model, test_set, base_idx, novel_idx, base, novel, n_base,
                                         ("base", "novel"), args)
    flag = "  [RANDOM WEIGHTS]" if synthetic or (not toy and args.pretrained in (None, "none")) else (
        "  [toy world]" if toy else "")
    _print_row("CoOp+AnchorOPT", rows["CoOp+AnchorOPT"], f"  ({time.perf_counter() - start:.1f} s){flag}")
    print(_verdict(rows, toy))
    if args.save:
        learner.set_classnames(base)
        save(stage1.frozen_anchors(), learner, base, args.save)
    if synthetic:
        print(RANDOM_NOTE)
    elif toy:
        print(TOY_NOTE)
    return 0


def _harmonic(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def _print_row(name: str, accs: tuple[float, float], tail: str = "") -> None:
    print(f"{name}: base {accs[0]:.1f}% | novel {accs[1]:.1f}% | HM {_harmonic(*accs):.1f}%{tail}")


def _base_novel(learner, model, test_set, base_idx, novel_idx, base, novel, n_base, modes, args):
    """(base, novel) accuracy (%): base classes first, then the learner rebuilt for the novel classes."""
    acc_base = accuracy(learner, model, Subset(test_set, base_idx), modes and modes[0], 0, args)
    learner.set_classnames(novel)
    acc_novel = accuracy(learner, model, Subset(test_set, novel_idx), modes and modes[1], n_base, args)
    learner.set_classnames(base)
    return acc_base, acc_novel


def _verdict(rows: dict, toy: bool) -> str:
    """One line: what the run shows, whichever way it came out."""
    hm = {name: _harmonic(*accs) for name, accs in rows.items()}
    parts = [f"CoOp+AnchorOPT's HM is {hm['CoOp+AnchorOPT'] - hm['CoOp']:+.1f} points against CoOp"]
    if "zero-shot" in hm:
        parts.append(f"{hm['CoOp+AnchorOPT'] - hm['zero-shot']:+.1f} against zero-shot")
    best = max(hm, key=hm.get)
    where = "toy-world figures, one seed" if toy else "one seed"
    return f"shows: {', '.join(parts)}; the best HM here is {best}'s ({where})."


def main(argv=None) -> int:
    """``python examples/quickstart.py`` / ``anchoropt demo``: parse ``argv`` and run."""
    p = argparse.ArgumentParser(prog="anchoropt demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: one line, as the anchoropt commands
        print(f"anchoropt demo: error: {err}", file=sys.stderr)
        return 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options, on ``p`` (its own parser, or the ``anchoropt demo`` sub-command)."""
    p.add_argument("--model", help="open_clip model name (e.g. ViT-B-16); omit for the offline toy-world demo")
    p.add_argument("--random", action="store_true",
                   help="without --model: the tiny random-weight tower on synthetic images instead of the toy world")
    p.add_argument("--toy-classes", type=int, default=40,
                   help="toy world: number of classes (half base, half novel; default 40)")
    p.add_argument("--toy-dataset", default="toy_food",
                   help="toy world: the suite dataset whose classes and style the demo uses (default toy_food: "
                        "dark photos, the style whose name is worth most to a prompt after textures)")
    p.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai) or a local checkpoint file;\n"
                                        "'none' or omitted: random weights")
    p.add_argument("--data", help="ImageFolder directory (one sub-directory per class)")
    p.add_argument("--descriptions", help="JSON {class name: [sentences]} (CuPL format) covering the base classes")
    p.add_argument("--shots", type=int, default=16, help="training images per base class (default 16)")
    p.add_argument("--stage1-steps", type=int, default=200, help="Stage I (anchor) optimisation steps")
    p.add_argument("--epochs", type=int, default=100, help="CoOp+AnchorOPT's Stage II epochs (100, as released)")
    p.add_argument("--n-soft", type=int, default=4, help="M, soft tokens of the normal prompt (4, as released)")
    p.add_argument("--coop-epochs", type=int, default=100, help="CoOp's epochs (100)")
    p.add_argument("--coop-n-soft", type=int, default=4, help="CoOp's M, its soft tokens (4)")
    p.add_argument("--batch-size", type=int, default=32, help="Stage II batch size")
    p.add_argument("--lr", type=float, default=0.002, help="Stage II SGD learning rate")
    p.add_argument("--ce-weight", type=float, default=100.0,
                   help="weight of the cross-entropy term (100, the released scripts')")
    p.add_argument("--kd-weight", type=float, default=1000.0,
                   help="weight of the KL(ensemble || normal) term (1000, the released scripts')")
    p.add_argument("--kd-normalization", default="released", choices=("released", "batchmean"),
                   help="'released': KL summed / (batch x classes), what the released weights assume (default); "
                        "'batchmean': per sample, the paper's text")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed for shots, initialisation and shuffling")
    p.add_argument("--save", metavar="DIR", help="save the anchors and the prompt learner (safetensors + JSON)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's small models gain nothing from more)")
