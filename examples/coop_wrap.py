"""Wrap your own CoOp-style prompt learner with AnchorOPT - no fork of your trainer.

    python examples/coop_wrap.py

Below, `PromptLearner`, `TextEncoder` and `CustomCLIP` stand for *your* code (written out in the shape of
KaiyangZhou/CoOp's `trainers/coop.py`); the AnchorOPT part is the three marked lines.  Offline, on a tiny
random OpenAI-clip-shaped model: the numbers mean nothing.  In a Dassl trainer see docs/integrations/coop.md.
"""

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

import anchoropt.adapters as aoa
from anchoropt.testing import tiny_openai_clip


# ---------------------------------------------------------------- your existing code (CoOp's layout)
class PromptLearner(nn.Module):
    """[SOS] ctx x n_ctx {class} . [EOT] with one learned context shared by all classes."""

    def __init__(self, classnames, clip_model, n_ctx=4):
        super().__init__()
        width = clip_model.ln_final.weight.shape[0]
        self.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        prompts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in classnames]
        tokenized = open_clip.tokenize(prompts)                              # clip.tokenize in CoOp
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized)
        self.register_buffer("token_prefix", embedding[:, :1])             # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:])     # class, ".", EOT, padding
        self.tokenized_prompts = tokenized
        self.n_cls, self.n_ctx, self.class_token_position = len(classnames), n_ctx, "end"

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, 77, D)


class TextEncoder(nn.Module):
    def __init__(self, clip_model):
        super().__init__()
        self.clip = clip_model

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.clip.positional_embedding
        x = self.clip.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)      # sequence-first blocks
        x = self.clip.ln_final(x)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.clip.text_projection


class CustomCLIP(nn.Module):
    def __init__(self, classnames, clip_model):
        super().__init__()
        self.prompt_learner = PromptLearner(classnames, clip_model)
        self.tokenized_prompts = self.prompt_learner.tokenized_prompts
        self.image_encoder, self.text_encoder = clip_model.visual, TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale

    def forward(self, image):
        image_features = F.normalize(self.image_encoder(image), dim=-1)
        text_features = F.normalize(self.text_encoder(self.prompt_learner(), self.tokenized_prompts), dim=-1)
        return self.logit_scale.exp() * image_features @ text_features.t()


# ---------------------------------------------------------------- training with AnchorOPT
print("NOTE: RANDOM WEIGHTS (tiny test model) and random images: the numbers below mean nothing.")
torch.manual_seed(0)
clip_model = tiny_openai_clip(fp16=False).requires_grad_(False)
classnames = ["cat", "dog", "sea turtle"]
anchors = torch.randn(1, 64) * 0.02                     # your Stage I anchors: a tensor, .safetensors or model.pth.tar
model = CustomCLIP(classnames, clip_model)
handle = aoa.coop.wrap(model.prompt_learner, clip_model=clip_model,          # AnchorOPT (1/3)
                       classnames=classnames, anchors=anchors, owner=model)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
print("trained:", sorted(n for n, p in model.named_parameters() if p.requires_grad))

images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
for step in range(3):
    logits = model(images)
    loss = handle.loss(labels, logits=logits)                                # AnchorOPT (2/3): CE + KD
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step + 1}: loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    base = handle.predict(model(images))                                     # AnchorOPT (3/3): base classes
    novel = handle.predict(model(images), mode="novel")                      # ensemble, for unseen classes
print("prompt:", handle.describe())
print("predictions (base / novel):", base.argmax(-1).tolist(), novel.argmax(-1).tolist())
handle.remove()                                                              # back to plain CoOp
