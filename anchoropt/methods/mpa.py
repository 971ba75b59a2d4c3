"""MPA (PAE's Modal Pre-Alignment): visual deep prompts initialised from the frozen tower's frequency shortcuts.

On one training batch (arXiv 2601.20232; PAE's released ``init_mpa``, ``../shared/reference/pae_atprompt.md`` §1.2):

1. ``S`` binary windows tile the ``fftshift``-centred 2-D spectrum (window 16, stride 8 at 224 px: 27 x 27 =
   729 masks; scaled with the image size, :func:`spectral_masks`); each keeps one band of every channel;
2. every mask's filtered batch ``real(ifft2(ifftshift(fftshift(fft2(x)) * M)))`` is scored by a task loss
   (cross-entropy of a classifier, no gradients): ``S`` forward passes of the batch;
3. the ``T`` lowest-loss masks, one per prompt token;
4. prompt token ``t``: the filtered batch's patch embeddings (``conv1`` + position embedding + ``ln_pre``,
   class token dropped) pooled with energy weights ``||e||^2 / sum ||e||^2`` over the **whole batch**;
5. deeper prompts: the first layer's ``(T, D)`` prompts run alone (no class or patch tokens) through the
   frozen blocks, block ``i``'s output initialising the prompts of block ``i + 1``.

Task loss (a documented deviation): for CLIP we rank with the **zero-shot text classifier**
(:func:`zero_shot_classifier`, class-name text features).  PAE's code calls its ``init_mpa`` right after building
the model, so its "task loss" is that of a **randomly initialised head**; :func:`random_head_classifier`
reproduces that choice.

Ranking prompts (``ranking=``): by default the masks are ranked on the frozen tower **without** prompts.  That is
**not** what PAE's code computes: its ``init_mpa`` runs the prompted model, whose (VPT-deep) prompts are still
zero-initialised, and zero tokens are not absent - after the pre-norm each is the norm's bias vector, it is a key
and a value every token attends to, at every prompted block - so the ranking losses differ and with them,
at times, the chosen masks (measured on one setting: 1 of 4 chosen masks changed).  ``ranking="zero_prompts"``
ranks with ``T`` zero prompt tokens appended before the pre-norm and zero deep prompts at blocks ``1 .. depth``
(:class:`~anchoropt.methods.vision.VisionPrompts`, removed afterwards; open_clip / timm towers it supports),
as PAE's prompted model does; the pooled prompts and their propagation are the same in both.

Where the result goes: any free visual deep prompts (VPT-deep on an open_clip ``visual``, the IVLP/PromptSRC
per-block ``VPT_shallow`` parameters) - copy ``prompts[i]`` into layer ``i``'s tensor.  MaPLe's visual prompts
are not free parameters (they are projections of the text prompts), so MPA does not apply to MaPLe itself.

Axes: ``B`` images, ``S`` masks, ``T`` prompt tokens, ``P`` patches, ``D`` visual width, ``C`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MPAResult",
    "mpa_init",
    "spectral_masks",
    "spectral_filter",
    "rank_masks",
    "patch_embeddings",
    "energy_pool",
    "propagate",
    "zero_shot_classifier",
    "zero_shot_text_features",
    "random_head_classifier",
]

REFERENCE_SIZE = 224  # PAE's window 16 / stride 8 are for 224 px images
RANKINGS = ("no_prompts", "zero_prompts")


@dataclass(frozen=True)
class MPAResult:
    """MPA's output: ``prompts`` ``(1 + depth, T, D)`` (layer 0 first), the chosen ``mask_index`` ``(T,)``,
    every mask's ``losses`` ``(S,)`` and the ``masks`` ``(S, H, W)`` themselves."""

    prompts: torch.Tensor
    mask_index: torch.Tensor
    losses: torch.Tensor
    masks: torch.Tensor

    @property
    def first(self) -> torch.Tensor:
        """The input layer's prompts ``(T, D)``."""
        return self.prompts[0]

    @property
    def deep(self) -> torch.Tensor:
        """The deeper layers' prompts ``(depth, T, D)`` (blocks ``1 .. depth``)."""
        return self.prompts[1:]


def spectral_masks(
    height: int, width: int | None = None, window: int | None = None, stride: int | None = None, device=None
) -> torch.Tensor:
    """Sliding-window masks ``(S, H, W)`` (bool) over the centred spectrum, row-major window positions.

    ``window`` / ``stride`` default to PAE's 16 / 8 scaled by ``size / 224`` (rounded, at least 1), so a
    224 px image gets ``((224 - 16) // 8 + 1)^2 = 729`` masks.
    """
    width = height if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    size = min(height, width)
    window = max(1, round(16 * size / REFERENCE_SIZE)) if window is None else window
    stride = max(1, round(8 * size / REFERENCE_SIZE)) if stride is None else stride
    if not (isinstance(window, int) and isinstance(stride, int) and 1 <= window <= size and stride >= 1):
        raise ValueError(f"window must be in [1, {size}] and stride >= 1, got window={window!r}, stride={stride!r}")
    rows = range(0, height - window + 1, stride)
    cols = range(0, width - window + 1, stride)
    masks = torch.zeros(len(rows) * len(cols), height, width, dtype=torch.bool, device=device)
    for k, (r, c) in enumerate((r, c) for r in rows for c in cols):
        masks[k, r : r + window, c : c + window] = True
    return masks


def spectral_filter(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``real(ifft2(ifftshift(fftshift(fft2(x)) * mask)))``: ``(B, 3, H, W)`` images, ``(H, W)`` mask, every channel."""
    if images.dim() != 4 or tuple(mask.shape) != tuple(images.shape[-2:]):
        raise ValueError(f"images (B, C, H, W) and a (H, W) mask expected, got {tuple(images.shape)} and {tuple(mask.shape)}")
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    spectrum = spectrum * mask.to(spectrum.device, torch.float32)
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


@torch.no_grad()
def rank_masks(
    classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy ``(S,)`` of ``classify(filtered images)`` (``(B, C)`` logits) against ``labels`` per mask."""
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    losses = [F.cross_entropy(classify(spectral_filter(images, m)).float(), labels.to(images.device)) for m in masks]
    return torch.stack(losses)


def _visual_dtype(visual: nn.Module) -> torch.dtype:
    return visual.conv1.weight.dtype


def patch_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tokens a visual transformer's first block sees, class token dropped: ``(B, P, D)`` float32.

    open_clip ``VisionTransformer`` (its ``_embeds``: ``conv1``, class token, position embedding, ``ln_pre``)
    and the OpenAI ``clip`` layout (same attribute names) are supported.
    """
    if not all(hasattr(visual, a) for a in ("conv1", "positional_embedding")):
        raise TypeError(
            f"{type(visual).__name__} is not a ViT image tower (conv1 + positional_embedding): MPA needs patch "
            "embeddings (open_clip VisionTransformer or OpenAI clip's VisionTransformer)"
        )
    x = images.to(_visual_dtype(visual))
    if hasattr(visual, "_embeds"):  # open_clip >= 3
        tokens = visual._embeds(x)
    else:
        x = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        tokens = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    n_prefix = 0 if getattr(visual, "class_embedding", None) is None else 1
    return tokens[:, n_prefix:].float()


def energy_pool(tokens: torch.Tensor) -> torch.Tensor:
    """``sum_{b,p} w_bp e_bp`` with ``w = ||e||^2 / sum_{b,p} ||e||^2`` (one weighting over the whole batch): ``(B, P, D) -> (D,)``."""
    energy = tokens.pow(2).sum(dim=-1)  # (B, P)
    weights = energy / energy.sum().clamp_min(torch.finfo(tokens.dtype).tiny)
    return (weights[..., None] * tokens).sum(dim=(0, 1))


@torch.no_grad()
def propagate(blocks: Sequence[nn.Module], first: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """Deeper prompts ``(len(blocks), T, D)``: ``first`` ``(T, D)`` run alone through ``blocks`` in turn."""
    current, out = first[None] if batch_first else first[:, None], []
    for block in blocks:
        weight = next(block.parameters(), None)
        current = block(current.to(weight.dtype) if weight is not None else current)
        out.append(current[0] if batch_first else current[:, 0])
    return torch.stack(out).float() if out else first.new_zeros(0, *first.shape).float()


def zero_shot_classifier(
    visual: nn.Module, text_features: torch.Tensor, logit_scale: float | torch.Tensor = 100.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> scale * normalize(visual(images)) @ normalize(text)^T``: CLIP's zero-shot logits ``(B, C)``."""
    text = F.normalize(text_features.detach().float(), dim=-1)

    def classify(images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(visual(images.to(_visual_dtype(visual))).float(), dim=-1)
        return float(logit_scale) * features @ text.to(features.device).t()

    return classify


@torch.no_grad()
def zero_shot_text_features(
    model: nn.Module, classnames: Sequence[str], tokenizer: Callable | None = None, template: str = "a photo of a {}."
) -> torch.Tensor:
    """Class-name text features ``(C, E)`` of a CLIP model (``model.encode_text``) for :func:`zero_shot_classifier`."""
    if not classnames:
        raise ValueError("zero-shot text features need at least one class name")
    if tokenizer is None:
        from ..template import default_tokenizer

        tokenizer = default_tokenizer()
    ids = tokenizer([template.format(name.replace("_", " ")) for name in classnames])
    device = next(model.parameters()).device
    return model.encode_text(ids.to(device)).float()


def random_head_classifier(visual: nn.Module, n_classes: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """PAE's released choice: a randomly initialised linear head (PyTorch's default init) on the frozen
    tower's features, ``images -> (B, C)``; built on the first call, from ``seed``."""
    head: list[nn.Linear] = []

    def classify(images: torch.Tensor) -> torch.Tensor:
        features = visual(images.to(_visual_dtype(visual))).float()
        if not head:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head.append(nn.Linear(features.shape[-1], n_classes).to(features.device))
        return head[0](features)

    return classify


@torch.no_grad()
def mpa_init(
    visual: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_prompts: int,
    depth: int = 0,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    text_features: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 100.0,
    window: int | None = None,
    stride: int | None = None,
    ranking: str = "no_prompts",
) -> MPAResult:
    """MPA prompts for a ViT image tower from one training batch.

    Args:
        visual: the frozen image tower (open_clip ``model.visual``, or OpenAI clip's).
        images: ``(B, 3, H, W)`` one training batch, already transformed (PAE: the train loader's first batch).
        labels: ``(B,)`` class indices.
        n_prompts: ``T`` prompt tokens (one mask each); at most the number of masks.
        depth: deeper layers to initialise by propagation (prompts for blocks ``1 .. depth``).
        classifier: ``images -> (B, C)`` logits ranking the masks; else the zero-shot classifier built from
            ``text_features`` ``(C, E)`` (class-name text features) and ``logit_scale``.
            :func:`random_head_classifier` is PAE's released choice.
        window, stride: spectral window (default: 16 / 8 scaled to the image size).
        ranking: ``"no_prompts"`` (default: the bare frozen tower) or ``"zero_prompts"`` (``T`` zero prompts and
            zero deep prompts at blocks ``1 .. depth`` in the tower while ranking, as PAE's code; module docstring).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be an int >= 1, got {n_prompts!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, H, W) batch, got {tuple(images.shape)}")
    if classifier is None:
        if text_features is None:
            raise ValueError("MPA ranks masks by a task loss: pass text_features (zero-shot classifier) or classifier=")
        classifier = zero_shot_classifier(visual, text_features, logit_scale)
    blocks = list(visual.transformer.resblocks) if hasattr(visual, "transformer") else []
    if not 0 <= depth <= len(blocks) - 1:
        raise ValueError(f"depth must be in [0, {max(len(blocks) - 1, 0)}] for this {len(blocks)}-block tower, got {depth}")
    masks = spectral_masks(images.shape[-2], images.shape[-1], window, stride, device=images.device)
    if n_prompts > masks.shape[0]:
        raise ValueError(f"{n_prompts} prompts need as many masks, but only {masks.shape[0]} fit these images")
    if ranking == "zero_prompts":
        losses = _rank_with_zero_prompts(visual, classifier, images, labels, masks, n_prompts, depth)
    else:
        losses = rank_masks(classifier, images, labels, masks)
    chosen = torch.topk(losses, n_prompts, largest=False).indices  # one mask per prompt token
    first = torch.stack([energy_pool(patch_embeddings(visual, spectral_filter(images, masks[s]))) for s in chosen])
    from ..deep import _batch_first

    deep = propagate(blocks[:depth], first, _batch_first(visual.transformer, blocks)) if depth else first.new_zeros(0, *first.shape)
    return MPAResult(torch.cat([first[None], deep]), chosen, losses, masks)


def _rank_with_zero_prompts(visual: nn.Module, classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                            labels: torch.Tensor, masks: torch.Tensor, n_prompts: int, depth: int) -> torch.Tensor:
    """:func:`rank_masks` with ``T`` zero prompts in the tower (and zero deep prompts at blocks ``1 .. depth``)."""
    from .vision import VisionPrompts

    prompts = VisionPrompts(visual, n_prompts, depth)
    try:
        width, device = prompts.tower.width, images.device
        zeros = torch.zeros(n_prompts, width, device=device)
        deep = torch.zeros(depth, n_prompts, width, device=device) if depth else None
        with prompts.active(zeros, deep):
            return rank_masks(classify, images, labels, masks)
    finally:
        prompts.remove()
