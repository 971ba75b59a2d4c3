"""MaPLe + AnchorOPT (or CoCoOp / DePT, alone or with AnchorOPT) as modules in your own training loop.

    python examples/methods_on_open_clip.py                      # MaPLe + AnchorOPT on a 20-class toy world
    python examples/methods_on_open_clip.py --method dept --template coop
    python examples/methods_on_open_clip.py --output my_toy_world   # keep the toy world it writes

It writes only the toy world, into --output (default: a temporary folder, removed at the end); a folder that
already exists is refused, never replaced.

Offline: the toy world (invented classes, 32 px images) and its shipped small CLIP, `toy-clip`. The figures it
prints are toy-world figures: they show the loop learns, not how the method does on real data. With your own
model, replace `load_model()` by `open_clip.create_model_and_transforms(...)`: the modules take any open_clip
CLIP / CustomTextCLIP (MaPLe: an open_clip ViT or timm ViT / EVA image tower).
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from anchoropt import AnchorLearner
from anchoropt.methods import CoCoOp, DePT, MaPLe
from anchoropt.toyworld import load_model
from anchoropt.toyworld.make import make

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--method", choices=["maple", "cocoop", "dept"], default="maple")
p.add_argument("--template", choices=["coop", "atprompt", "anchoropt"], default="anchoropt")
p.add_argument("--classes", type=int, default=20)
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--stage1-steps", type=int, default=100)
p.add_argument("--output", help="new folder for the toy world (default: a temporary one, removed at the end)")
args = p.parse_args()

scratch = None if args.output else tempfile.TemporaryDirectory(prefix="anchoropt-example-")
world = Path(args.output) if args.output else Path(scratch.name) / "toy_world"
if world.exists():
    p.error(f"--output {world} already exists: name a new folder (this example never replaces one)")
make(world, classes=args.classes, per_class=30, seed=1)         # train/ val/ test/ + descriptions.json
model, preprocess, tokenizer = load_model()                     # frozen toy CLIP, offline
train_set, test_set = ImageFolder(world / "train", preprocess), ImageFolder(world / "test", preprocess)
classnames = train_set.classes
n_base = math.ceil(len(classnames) / 2)
base, novel = classnames[:n_base], classnames[n_base:]          # base-to-novel: train on the first half

options = dict(tokenizer=tokenizer)
if args.template == "anchoropt":                                # Stage I: anchors from the descriptions
    stage1 = AnchorLearner(model, base, n_anchor=1, tokenizer=tokenizer)
    stage1.fit(world / "descriptions.json", steps=args.stage1_steps, progress=False)
    options["anchors"] = stage1.frozen_anchors()
if args.template == "atprompt":
    options["attributes"] = ["color", "shape"]
Method = {"maple": MaPLe, "cocoop": CoCoOp, "dept": DePT}[args.method]
if args.method == "maple":  # released: n_ctx 2, PROMPT_DEPTH 9; toy-clip's towers have 4 blocks
    options.update(n_ctx=2, prompt_depth=4)
learner = Method(model, base, template=args.template, **options)


def inputs(images):
    """MaPLe prompts the image tower itself; CoCoOp and DePT take its frozen features."""
    if learner.takes_images:
        return images
    with torch.no_grad():
        return model.encode_image(images)


optim = torch.optim.SGD(learner.optimizer_groups(0.002), lr=0.002, momentum=0.9)  # DePT: its head at 6.5x
base_train = Subset(train_set, [i for i, y in enumerate(train_set.targets) if y < n_base])
learner.train()
for epoch in range(args.epochs):
    for images, labels in DataLoader(base_train, batch_size=8 if args.method == "cocoop" else 32, shuffle=True):
        out = learner(inputs(images))                           # (logits, logits_anchor or None)
        loss = out.loss(labels)                                 # the method's loss (+ KD with anchors)
        optim.zero_grad()
        loss.backward()
        optim.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}")


@torch.no_grad()
def accuracy(classes, mode):
    """Top-1 (%) on the test images of ``classes`` (the learner scores ``classes`` only)."""
    offset = classnames.index(classes[0])
    keep = [i for i, y in enumerate(test_set.targets) if offset <= y < offset + len(classes)]
    correct = 0
    for images, labels in DataLoader(Subset(test_set, keep), batch_size=100):
        correct += (learner.predict(inputs(images), mode=mode).argmax(-1) == labels - offset).sum().item()
    return 100.0 * correct / len(keep)


learner.eval()
acc_base = accuracy(base, "base")
learner.set_classnames(novel)                                   # novel classes: with anchors, the ensemble
acc_novel = accuracy(novel, "novel")
hm = 2 * acc_base * acc_novel / (acc_base + acc_novel)
label = args.method if args.template == "coop" else f"{args.method}+{args.template}"
print(f"{label}: base {acc_base:.1f}% | novel {acc_novel:.1f}% | HM {hm:.1f}% "
      f"(toy-world figures, {args.classes} classes)")
if scratch is not None:
    scratch.cleanup()
