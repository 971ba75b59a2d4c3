"""The building blocks alone: AnchorPromptTemplate + PositionMatrix inside a model of your own.

    python examples/building_blocks.py

`AnchorPromptTemplate` tokenises the two prompts of a class list once and knows every prompt's true EOT;
`PositionMatrix` arranges K = M + N tokens with a straight-through Gumbel-softmax (a hard one-hot matrix
forward, soft gradients back; the deterministic argmax in eval()).  Here they make the text side of a small
classifier whose soft tokens come from elsewhere (a linear map of a learned code, standing for your own
module).  Offline, on a tiny random open_clip tower: the numbers mean nothing.
"""

import torch
import torch.nn.functional as F
from torch import nn

from anchoropt import AnchorPromptTemplate, PositionMatrix
from anchoropt.testing import tiny_open_clip


class MyTextHead(nn.Module):
    """Text features (C, E) of ``[SOS] P @ [soft; anchors] {class} . [EOT]`` with soft tokens of your making."""

    def __init__(self, clip_model, classnames, anchors, n_soft=2):
        super().__init__()
        self.template = AnchorPromptTemplate(clip_model, classnames, n_soft=n_soft, n_anchor=anchors.shape[0])
        self.position = PositionMatrix(n_soft, anchors.shape[0], tau=1.0)
        width = self.template.tower.width
        self.code = nn.Parameter(torch.randn(8) * 0.1)               # your own parameters ...
        self.to_soft = nn.Linear(8, n_soft * width)                 # ... producing the M soft tokens
        self.register_buffer("anchors", anchors)                    # frozen Stage I anchors (N, D)
        self.n_soft, self.width = n_soft, width

    def forward(self):
        soft = self.to_soft(self.code).view(self.n_soft, self.width)          # (M, D)
        slots = self.position(torch.cat([soft, self.anchors]))                # (M+N, D), arranged
        features = self.template.encode_slots(self.template.normal, slots)    # (C, E); shared prefix run once
        return F.normalize(features, dim=-1)

    def anchor_features(self):
        """The anchor prompt ``[SOS] [Anc] of {class} . [EOT]`` (frozen: compute once and keep)."""
        with torch.no_grad():
            return F.normalize(self.template.encode_slots(self.template.anchor, self.anchors), dim=-1)


print("NOTE: RANDOM WEIGHTS (tiny test tower): the numbers below mean nothing.")
torch.manual_seed(0)
clip_model = tiny_open_clip(image_size=32).requires_grad_(False)
head = MyTextHead(clip_model, ["cat", "dog", "sea turtle"], anchors=torch.randn(1, 64) * 0.02)
print("prompts:", head.template.texts("normal"))
print("true EOT index per class:", head.template.normal.pool_index.tolist())

image_features = F.normalize(torch.randn(4, 32), dim=-1)          # (B, E) from your image tower
labels = torch.tensor([0, 1, 2, 1])
optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
for step in range(3):
    logits = 100.0 * image_features @ head().t()                 # (B, C)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step + 1}: loss {loss.item():.4f}, position-logit grad norm "
          f"{head.position.logits.grad.norm():.2e}")

head.eval()                                                       # argmax arrangement from here on
print("arrangement (slot -> source):", head.position.describe())
print("anchor-prompt features:", tuple(head.anchor_features().shape))
# the position matrix alone, on any (..., K, D) tokens:
print("a fixed arrangement:", PositionMatrix(2, 1, arrangement="anchor_middle").describe())
