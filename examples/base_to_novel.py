"""Save on base classes, predict novel ones: what is saved is class-independent, prompts are rebuilt on load.

    python examples/base_to_novel.py

A prompt learner trained on the base classes is saved (safetensors + JSON: soft tokens, anchors, position
logits); loading it for any other class list rebuilds the class-dependent prompts.  Novel classes are
scored with the ensemble of the normal and the anchor prompt (`mode="novel"`), base classes with the
normal prompt (`mode="base"`).  Offline, on a tiny random open_clip tower: the numbers mean nothing.
"""

import torch
import torch.nn.functional as F

from anchoropt import AnchorOPTPromptLearner, load_prompt_learner, save_anchors
from anchoropt.testing import tiny_open_clip

print("NOTE: RANDOM WEIGHTS (tiny test tower): the numbers below mean nothing.")
torch.manual_seed(0)
clip_model = tiny_open_clip(image_size=32).requires_grad_(False)
base = ["cat", "dog", "golden retriever"]
novel = ["tree frog", "fire truck", "sailboat", "sea turtle"]
anchors = torch.randn(1, 64) * 0.02                                    # Stage I anchors, learned on base

# ---- training process: train on base, save
learner = AnchorOPTPromptLearner(clip_model, base, anchors, n_soft=4)
with torch.no_grad():                                                  # (a real run trains here)
    learner.soft.add_(torch.randn_like(learner.soft))
learner.eval().save_pretrained("runs/b2n/prompt_learner")
save_anchors(anchors, "runs/b2n/anchors.safetensors", classnames=base)

# ---- evaluation process: load for the novel classes (any list; no retraining)
novel_learner = load_prompt_learner("runs/b2n/prompt_learner", clip_model, novel).eval()
image_features = F.normalize(torch.randn(5, 32), dim=-1)               # (B, E) of novel-class test images
novel_logits = novel_learner.predict(image_features, mode="novel")     # (B, 4): ensemble
print("novel logits:", tuple(novel_logits.shape), "predicted:", [novel[i] for i in novel_logits.argmax(-1)])

base_again = AnchorOPTPromptLearner.from_pretrained("runs/b2n/prompt_learner", clip_model, base).eval()
same = torch.allclose(base_again.predict(image_features, mode="base"), learner.predict(image_features, mode="base"))
print("base logits after the round trip identical:", same)
# one learner can also switch in place: learner.set_classnames(novel)
