"""A complete open_clip training loop with AnchorOPT: the README's "Use it" snippet, made runnable.

    python examples/open_clip_training.py                       # offline: tiny random tower, synthetic images
    python examples/open_clip_training.py --model ViT-B-16 --pretrained openai \
        --images my_images --descriptions descriptions.json \
        --output runs/example                                   # a real model on my_images/{train,test}/<class>/

It writes only under --output (default: a temporary folder, removed at the end): the synthetic images of the
offline run and the saved learner. It reads --images and --descriptions and never writes into them.

Offline the accuracy means nothing (random weights); with a real model it is the base-to-novel protocol:
train on the first half of the classes, report base accuracy (normal prompt) and novel accuracy (ensemble).
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from anchoropt import AnchorLearner, AnchorOPTPromptLearner, StageIILoss

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default="tiny", help="open_clip model name; 'tiny': a random test tower (offline)")
p.add_argument("--pretrained", default=None, help="open_clip tag or a local checkpoint file (default: none)")
p.add_argument("--images", help="folder with train/<class>/ and test/<class>/ images (offline: synthetic ones)")
p.add_argument("--descriptions", help="{class: [sentences]} JSON (offline: made with the synthetic images)")
p.add_argument("--output", help="where to write (default: a temporary folder, removed at the end)")
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--stage1-steps", type=int, default=100)
args = p.parse_args()
scratch = None if args.output else tempfile.TemporaryDirectory(prefix="anchoropt-example-")
output = Path(args.output or scratch.name)
if args.images is None and args.model != "tiny":
    p.error("--model needs --images (a folder with train/<class>/ and test/<class>/) and --descriptions")
if args.images is not None and not Path(args.images, "train").is_dir():
    p.error(f"--images {args.images}: no train/ folder in it (expected train/<class>/ and test/<class>/)")

if args.model == "tiny":  # offline stand-in for open_clip.create_model_and_transforms(...)
    from anchoropt.datasets.folders import make_synthetic_image_folder
    from anchoropt.runner import eval_transform, train_transform
    from anchoropt.testing import tiny_open_clip

    print("NOTE: RANDOM WEIGHTS and synthetic images: the accuracies below mean nothing.")
    model = tiny_open_clip(image_size=32)
    preprocess_train, preprocess = train_transform(model), eval_transform(model)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")  # the CLIP BPE tokenizer ships with open_clip
    shapes = ["circle", "square", "stripe", "cross"]
    if args.images is None:  # synthetic images and their descriptions, under --output
        args.images, args.descriptions = str(output / "images"), str(output / "images" / "descriptions.json")
        make_synthetic_image_folder(Path(args.images) / "train", shapes, per_class=8)
        make_synthetic_image_folder(Path(args.images) / "test", shapes, per_class=4, seed=1)
        Path(args.descriptions).write_text(json.dumps({s: [f"a {s}.", f"a drawing of a {s}."] for s in shapes}))
else:
    model, preprocess_train, preprocess = open_clip.create_model_and_transforms(args.model,
                                                                                pretrained=args.pretrained)
    tokenizer = open_clip.get_tokenizer(args.model)
model.eval().requires_grad_(False)

# ---- from here on: the README snippet
train_set = ImageFolder(f"{args.images}/train", preprocess_train)  # images/train/<class>/*.jpg
test_set = ImageFolder(f"{args.images}/test", preprocess)
classnames = [c.replace("_", " ") for c in train_set.classes]
n_base = math.ceil(len(classnames) / 2)                             # first half: base, the rest: novel
base, novel = classnames[:n_base], classnames[n_base:]
base_train = Subset(train_set, [i for i, y in enumerate(train_set.targets) if y < n_base])


def image_features(images):
    with torch.no_grad():
        return F.normalize(model.encode_image(images), dim=-1)


def accuracy(learner, classes, mode):
    """Top-1 (%) on the test images of ``classes`` (a slice of ``classnames``)."""
    offset = classnames.index(classes[0])
    keep = [i for i, y in enumerate(test_set.targets) if offset <= y < offset + len(classes)]
    correct = 0
    for images, labels in DataLoader(Subset(test_set, keep), batch_size=100):
        correct += (learner.predict(image_features(images), mode=mode).argmax(-1) == labels - offset).sum().item()
    return 100.0 * correct / len(keep)


# Stage I: anchors from descriptions ({class: [sentence, ...]} JSON, e.g. CuPL's)
stage1 = AnchorLearner(model, base, n_anchor=1, tokenizer=tokenizer)
stage1.fit(args.descriptions, steps=args.stage1_steps, progress=False)  # SGD lr 0.002, momentum 0.9, cosine

# Stage II: soft tokens + position matrix, anchors frozen
learner = AnchorOPTPromptLearner(model, base, stage1.frozen_anchors(), n_soft=4, tokenizer=tokenizer)
loss_fn = StageIILoss(ce_weight=1.0, kd_weight=10.0, temperature=1.0)
optim = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
learner.train()
for epoch in range(args.epochs):
    for images, labels in DataLoader(base_train, batch_size=32, shuffle=True):
        logits_normal, logits_anchor = learner(image_features(images))  # anchor features: computed once
        loss = loss_fn(logits_normal, logits_anchor, labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}")

learner.eval()                                                      # deterministic position matrix
learner.save_pretrained(output / "anchoropt")                       # safetensors + JSON
novel_learner = AnchorOPTPromptLearner.from_pretrained(output / "anchoropt", model, novel, tokenizer=tokenizer)
acc_base = accuracy(learner, base, "base")                          # normal prompt
acc_novel = accuracy(novel_learner.eval(), novel, "novel")          # ensemble with the anchor prompt
print(f"base {acc_base:.1f}% | novel {acc_novel:.1f}% on {len(test_set)} test images")
print(f"learner saved to {output / 'anchoropt'}" if scratch is None else "(pass --output DIR to keep the saved learner)")
if scratch is not None:
    scratch.cleanup()
