"""The deep variant (paper §3.2.3): per-layer soft prompts, the anchors' own hidden states carried through.

    python examples/deep_variant.py

`deep_depth=D` gives text blocks 1..D their own M soft tokens (`learner.deep.prompts`, shape (D, M, width)),
placed by the same position matrix, while the anchor slots keep the hidden state the previous block gave
them.  Everything else is the shallow learner's API.  Offline, on a tiny random open_clip tower (3 blocks):
the numbers mean nothing.  Details: docs/deep.md.
"""

import torch
import torch.nn.functional as F

from anchoropt import AnchorOPTPromptLearner, StageIILoss
from anchoropt.testing import tiny_open_clip

print("NOTE: RANDOM WEIGHTS (tiny test tower): the numbers below mean nothing.")
torch.manual_seed(0)
clip_model = tiny_open_clip(image_size=32, layers=3).requires_grad_(False)
classnames = ["cat", "dog", "sea turtle", "fire truck"]
anchors = torch.randn(1, 64) * 0.02                                   # Stage I anchors (N, D)
learner = AnchorOPTPromptLearner(clip_model, classnames[:2], anchors, n_soft=2, deep_depth=2)  # blocks 1..2
print("deep prompts:", tuple(learner.deep.prompts.shape))

loss_fn = StageIILoss(ce_weight=1.0, kd_weight=10.0)
optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.0035, momentum=0.9)
images = torch.randn(4, 3, 32, 32)
labels = torch.tensor([0, 1, 0, 1])
with torch.no_grad():
    features = F.normalize(clip_model.encode_image(images), dim=-1)  # (B, E)
learner.train()
for step in range(3):
    logits_normal, logits_anchor = learner(features)
    loss = loss_fn(logits_normal, logits_anchor, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step + 1}: loss {loss.item():.4f}, deep-prompt grad norm {learner.deep.prompts.grad.norm():.2e}")

learner.eval()
learner.save_pretrained("runs/deep")                                  # deep prompts saved with the rest
again = AnchorOPTPromptLearner.from_pretrained("runs/deep", clip_model, classnames[2:])  # novel classes
print("novel logits:", tuple(again.eval().predict(features, mode="novel").shape))
learner.deep_hooks.remove()                                           # the tower is plain open_clip again
again.deep_hooks.remove()
