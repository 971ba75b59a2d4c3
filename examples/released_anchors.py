"""Use the authors' released Stage I anchors (Dassl `model.pth.tar`) - read without running pickled code.

    python examples/released_anchors.py [CHECKPOINT]

CHECKPOINT defaults to the first `*.pth.tar` in $ANCHOROPT_SHARED_DATA/official_anchors, else in
../shared/data/official_anchors next to the checkout; with none there the example says so and exits 0.
The released anchors were learned on CLIP ViT-B/16 (width 512): here they go into a random-weight
ViT-B/16-shaped text tower, which exercises the code path (the numbers mean nothing); with a real model
use `open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")`.
"""

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from anchoropt import AnchorOPTPromptLearner, load_anchors
from anchoropt.testing import vit_b16_text_clip


def default_checkpoint() -> Path | None:
    shared = os.environ.get("ANCHOROPT_SHARED_DATA")
    folder = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared" / "data"
    found = sorted((folder / "official_anchors").glob("*.pth.tar"))
    return found[0] if found else None


path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_checkpoint()
if path is None:
    print("skipped: no released checkpoint found (pass its path, or set ANCHOROPT_SHARED_DATA)")
    raise SystemExit(0)

anchors = load_anchors(path, expected_width=512)      # safe reader: no unpickling of code, width checked
print(f"{path.name}: anchors {tuple(anchors.shape)}, norm {anchors.norm(dim=-1).tolist()}")

print("NOTE: RANDOM WEIGHTS (ViT-B/16-shaped test tower): the numbers below mean nothing.")
torch.manual_seed(0)
clip_model = vit_b16_text_clip().requires_grad_(False)
learner = AnchorOPTPromptLearner(clip_model, ["airplane", "face", "leopard"], anchors, n_soft=4).eval()
image_features = F.normalize(torch.randn(2, 512), dim=-1)
print("anchor-prompt features:", tuple(learner.anchor_features().shape),
      "| novel logits:", tuple(learner.predict(image_features, mode="novel").shape))
