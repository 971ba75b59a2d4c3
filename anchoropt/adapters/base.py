"""Shared machinery of the adapter shims: AnchorOPT attached to a CoOp-family prompt learner.

What an injection does to the user's prompt learner (``L`` = 77 positions, ``M`` = ``n_ctx`` soft tokens,
``N`` anchors, ``C`` classes, ``D`` width)::

    peer output        [SOS] ctx_1 .. ctx_M  class . [EOT] pad .. pad           (..., C, L, D)
    rewritten output   [SOS] P @ [ctx; anchors]  class . [EOT] pad .. pad       (..., C, L, D)
                             \\__ M + N slots __/          (the last N pad rows are dropped)
    tokenized_prompts  shifted by N *in place*, so argmax pooling reads the true EOT

* The rewrite is a forward hook on the prompt learner: the peer's ``forward`` is not touched, and
  :meth:`AnchorOPTInjection.remove` gives back the original outputs exactly.
* The injection is registered as the child ``prompt_learner.anchoropt``: its position logits are
  ``prompt_learner.anchoropt.position.logits`` (fp32), its anchors the persistent fp32 buffer
  ``prompt_learner.anchoropt.anchors`` (fixed shapes, so base -> novel reloads work); the peers' optimizer
  construction, freezing by name and checkpointing pick them up unchanged.
* The anchor prompt ``[SOS] anchors {preposition} {class} . [EOT]`` runs through the user's own frozen
  text transformer (via :class:`~anchoropt.TextTower`), once per class set and device.
* Image features (for the anchor logits) and, where the peer's model returns a loss instead of logits
  (CoCoOp, MaPLe, DePT in training), the normal-prompt text features are captured by hooks on the
  user's CLIP (``visual`` and ``ln_final``) during the model's own forward - or, when the text encoder
  runs on :func:`anchoropt.adapters.accelerate`'s fast path (which never produces the full-length
  ``ln_final`` output), handed over by it (:func:`text_pass`).

Axes: ``B`` images, ``C`` classes, ``L`` positions, ``D`` width, ``E`` feature width, ``K = M + N``.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from .._cache import TensorSnapshot
from ..losses import StageIILossConfig
from ..position import PositionMatrix
from ..template import AnchorPromptTemplate
from ..towers import TextTower
from . import dassl
from .inputs import (
    MODES,
    _id_targets,
    _no_autocast,
    _require,
    check_mode,
    peer_tokenizer,
    resolve_anchors,
    shift_token_ids,
)
from .patching import ClassPatch, patch_class

__all__ = ["AnchorOPTInjection", "ClassPatch", "find", "shift_token_ids", "MODES", "CHILD_NAME"]

CHILD_NAME = "anchoropt"
"""Name of the injection inside the prompt learner (``prompt_learner.anchoropt``)."""


class AnchorOPTInjection(nn.Module):
    """AnchorOPT attached to a peer's prompt learner; also the handle that removes it again.

    Do not build this class directly: use ``anchoropt.adapters.<method>.wrap`` or ``.patch``.

    Args:
        prompt_learner: the peer's prompt learner (CoOp ``PromptLearner``, CoCoOp ``PromptLearner``,
            MaPLe ``MultiModalPromptLearner``), already built.
        clip_model: the OpenAI-``clip`` model the learner was built from (its token embedding embeds the
            anchor prompt; its frozen text transformer encodes it).
        classnames: the learner's class names, in its order.
        anchors: Stage I anchors ``(N, D)``, or a path to them (our safetensors file or the authors'
            ``model.pth.tar``).
        owner: the ``CustomCLIP`` holding the learner (optional): if its ``tokenized_prompts`` is not the
            learner's own tensor, it is shifted too.
        tokenizer: ``list[str] -> (n, 77)`` ids; default: the ``clip.tokenize`` of the learner's module, else
            open_clip's identical CLIP BPE tokenizer.
        mode: ``"base"`` (normal prompt) or ``"novel"`` (ensemble with the anchor prompt) for :meth:`predict`.
        tau, position_init, arrangement, sample_in_eval: the :class:`~anchoropt.PositionMatrix`.
        preposition: the anchor prompt's word between anchors and class name ("of").
        ce_weight, kd_weight, kd_temperature, kd_normalization: the Stage II loss
            (:class:`~anchoropt.StageIILossConfig`); ``"released"`` normalisation matches the authors' tables.
    """

    kind = "generic"
    _peer_name = "prompt learner"
    peer_class_attr = "PromptLearner"  # the trainer module's class that :meth:`patch` replaces
    defaults: dict[str, Any] = {"kd_weight": 10.0}  # method defaults, below cfg.TRAINER.ANCHOROPT and keywords

    @classmethod
    def wrap(
        cls,
        prompt_learner: nn.Module,
        *,
        clip_model: nn.Module,
        classnames: Sequence[str],
        anchors: torch.Tensor | str | os.PathLike | None = None,
        owner: nn.Module | None = None,
        cfg: Any = None,
        defaults: dict[str, Any] | None = None,
        **options: Any,
    ) -> "AnchorOPTInjection":
        """Attach AnchorOPT to an already-built prompt learner; returns the handle (``handle.remove()`` undoes it).

        Call it before the optimizer is built (right after ``CustomCLIP(...)`` in ``build_model``), or rebuild
        the optimizer afterwards (:func:`anchoropt.adapters.dassl.rebuild_optimizer`).  Options come from (later
        wins) the method's defaults, ``cfg.TRAINER.ANCHOROPT`` and these keyword arguments (``mode``, ``tau``,
        ``ce_weight``, ``kd_weight``, ...; see the class).
        """
        merged = dassl.resolve_options(cfg, {"anchors": anchors, **options}, cls.defaults if defaults is None else defaults)
        return cls(prompt_learner, clip_model=clip_model, classnames=classnames, owner=owner, **merged)

    @classmethod
    def patch(
        cls,
        module: Any,
        *,
        anchors: torch.Tensor | str | os.PathLike | None = None,
        attr: str | None = None,
        defaults: dict[str, Any] | None = None,
        **options: Any,
    ) -> "ClassPatch":
        """Replace ``module.<peer class>`` (e.g. ``trainers.coop.PromptLearner``) before ``build_model()``, so
        every learner built afterwards carries AnchorOPT; returns the removable patch.

        Options as in :meth:`wrap`; ``mode`` defaults to the config's ``DATASET.SUBSAMPLE_CLASSES``.
        """
        chosen = cls.defaults if defaults is None else defaults
        return patch_class(module, attr or cls.peer_class_attr, cls, {"anchors": anchors, **options},
                           lambda cfg, opts: dassl.resolve_options(cfg, opts, chosen))

    def __init__(
        self,
        prompt_learner: nn.Module,
        *,
        clip_model: nn.Module,
        classnames: Sequence[str],
        anchors: torch.Tensor | str | os.PathLike | None = None,
        owner: nn.Module | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        mode: str = "base",
        tau: float = 1.0,
        position_init: str = "randn",
        arrangement: str = "learned",
        sample_in_eval: bool = False,
        preposition: str | None = "of",
        ce_weight: float = 1.0,
        kd_weight: float = 10.0,
        kd_temperature: float = 1.0,
        kd_normalization: str = "batchmean",
    ):
        super().__init__()
        learner = prompt_learner
        if not isinstance(learner, nn.Module):
            raise TypeError(f"expected the peer's prompt learner (an nn.Module), got {type(learner).__name__}")
        if isinstance(learner._modules.get(CHILD_NAME), AnchorOPTInjection):
            raise RuntimeError(
                f"this {type(learner).__name__} already carries AnchorOPT (prompt_learner.{CHILD_NAME}); "
                "remove() it first, or do not both patch() the class and wrap() the instance"
            )
        if CHILD_NAME in learner._modules or hasattr(learner, CHILD_NAME):
            raise RuntimeError(f"{type(learner).__name__} already has an attribute {CHILD_NAME!r}")
        _require(learner, ("ctx", "n_ctx", "n_cls", "tokenized_prompts", "token_prefix", "token_suffix"), self)
        self.check_learner(learner)

        ctx = learner.ctx
        width, device = int(ctx.shape[-1]), ctx.device
        n_soft = int(learner.n_ctx)
        anchors = resolve_anchors(anchors, width)
        n_anchor = int(anchors.shape[0])
        self.n_soft, self.n_anchor = n_soft, n_anchor
        self.mode = check_mode(mode)
        self.loss_config = StageIILossConfig(ce_weight, kd_weight, kd_temperature, kd_normalization)

        # -- the learner's tokens: check the layout, then shift the ids by N (refuses EOTs that fall off)
        self._prepare_learner(learner)
        try:
            ids = learner.tokenized_prompts
            classnames = list(classnames)
            if len(classnames) != int(learner.n_cls) or ids.shape[0] != int(learner.n_cls):
                raise ValueError(
                    f"got {len(classnames)} class names for a prompt learner with n_cls={learner.n_cls} "
                    f"({ids.shape[0]} tokenized prompts); pass the class names the learner was built with"
                )
            self.check_layout(learner)
            shifted = shift_token_ids(ids, n_soft, n_anchor, classnames)

            # -- the frozen anchor branch on the user's own CLIP text tower
            self.tower = self.make_tower(clip_model)
            if self.tower.width != width:
                raise ValueError(
                    f"the CLIP text tower has width {self.tower.width} but the prompt learner's ctx has width {width}"
                )
            tokenizer = tokenizer or peer_tokenizer(learner)
            self.template = AnchorPromptTemplate(self.tower, classnames, n_soft, n_anchor, preposition, tokenizer)
            self.register_buffer("anchors", anchors)
            self.position = PositionMatrix(
                n_soft, n_anchor, tau=tau, init=position_init, arrangement=arrangement, sample_in_eval=sample_in_eval
            )
            self.to(device)
            self.train(learner.training)  # follow the learner's mode (wrapping a model already in eval())
        except BaseException:
            self._undo_prepare(learner)
            raise

        # -- commit: nothing below can fail half-way
        # plain references, not child modules (a strong one to the learner, so copy.deepcopy of the model
        # gives the copy's injection the copied learner)
        object.__setattr__(self, "_clip", clip_model)
        object.__setattr__(self, "_learner", learner)
        self._id_tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor in _id_targets(learner, owner):
            self._id_tensors.append((tensor, tensor.clone()))
            tensor.copy_(shifted.to(tensor.device, tensor.dtype))
        self._pool_index = shifted.argmax(dim=-1)
        self._seq_len = int(shifted.shape[1])
        self._busy = False
        self._anchor_cache: tuple[tuple, TensorSnapshot, torch.Tensor] | None = None
        self.clear()
        learner.add_module(CHILD_NAME, self)
        self._hooks = [
            learner.register_forward_hook(_rewrite_hook),
            learner.register_forward_pre_hook(_reset_hook),
            clip_model.visual.register_forward_pre_hook(self._visual_pre_hook),
            clip_model.visual.register_forward_hook(self._visual_hook),
            clip_model.ln_final.register_forward_hook(self._ln_final_hook),
        ]
        self._removed = False

    # ------------------------------------------------------------------ per-method hooks (overridden)
    def check_learner(self, learner: nn.Module) -> None:
        """Refuse learners this method's shim cannot handle (called before anything is changed)."""

    def _prepare_learner(self, learner: nn.Module) -> None:
        """Fix-ups needed before the learner's forward can run (MaPLe: ``proj`` dtype)."""

    def _undo_prepare(self, learner: nn.Module) -> None:
        """Undo :meth:`_prepare_learner`."""

    def peer_forward_for_check(self, learner: nn.Module) -> torch.Tensor:
        """The learner's prompts ``(C, L, D)`` from one plain forward (for the layout check)."""
        return self.prompts_of(learner())

    def prompts_of(self, output: Any) -> torch.Tensor:
        """The prompt-embedding tensor inside the learner's output."""
        return output

    def with_prompts(self, output: Any, prompts: torch.Tensor) -> Any:
        """The learner's output with its prompt tensor replaced."""
        return prompts

    def after_rewrite(self) -> None:
        """Called after each prompt rewrite (MaPLe: arms the deep hooks for the text pass that follows)."""

    def make_tower(self, clip_model: nn.Module) -> TextTower:
        """The bridge that runs ``clip_model``'s frozen text transformer (MaPLe: the list protocol)."""
        return TextTower(clip_model)

    # ------------------------------------------------------------------ facts
    @property
    def prompt_learner(self) -> nn.Module | None:
        """The prompt learner this injection is attached to (``None`` once removed)."""
        return self._learner

    @property
    def removed(self) -> bool:
        return self._removed

    def describe(self) -> list[str]:
        """Slot -> source of the evaluation arrangement, e.g. ``['soft1', 'anchor1', 'soft2', ...]``."""
        return self.position.describe()

    def arrangement(self) -> dict[str, list[str]]:
        """The evaluation arrangement (row-wise argmax of the position logits) and what it leaves out.

        ``{"slots": describe(), "missing": sources no slot picks, "repeated": sources in several slots}``;
        the argmax rows are independent, so an anchor may be ``missing`` or a soft token ``repeated``.
        """
        slots = self.describe()
        sources = [self.position.source_name(j) for j in range(self.position.size)]
        return {
            "slots": slots,
            "missing": [name for name in sources if name not in slots],
            "repeated": [name for name in sources if slots.count(name) > 1],
        }

    def set_mode(self, mode: str) -> "AnchorOPTInjection":
        """``"base"``: :meth:`predict` returns the normal prompt's logits; ``"novel"``: the ensemble."""
        self.mode = check_mode(mode)
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_soft={self.n_soft}, n_anchor={self.n_anchor}, mode={self.mode!r}"

    # ------------------------------------------------------------------ the prompt rewrite
    def insert_anchors(self, prompts: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., C, L, D)`` peer prompts -> the same shape with ``P @ [ctx; anchors]`` in rows ``1 .. M+N``.

        One position matrix is drawn per call (shared by every image and class of the call).
        """
        m, n = self.n_soft, self.n_anchor
        length = prompts.shape[-2]
        matrix = self.position.matrix() if matrix is None else matrix
        self.last_matrix = matrix  # the sample this forward used (deep-variant hooks need the same one)
        soft = prompts[..., 1 : 1 + m, :]
        anchors = self.anchors.to(prompts.dtype).expand(*soft.shape[:-2], n, prompts.shape[-1])
        with _no_autocast(prompts.device):  # a one-hot selection: exact in the prompts' own dtype
            slots = self.position(torch.cat([soft, anchors], dim=-2), matrix)
        return torch.cat([prompts[..., :1, :], slots.to(prompts.dtype), prompts[..., 1 + m : length - n, :]], dim=-2)

    def check_layout(self, learner: nn.Module) -> None:
        """Refuse learners whose output is not ``[SOS] ctx(M) suffix`` (checked once, without gradients)."""
        with torch.no_grad():
            prompts = self.peer_forward_for_check(learner)
        m = self.n_soft
        prefix, suffix = learner.token_prefix, learner.token_suffix
        ok = (
            prompts.dim() == 3
            and prompts.shape[0] == prefix.shape[0]
            and prompts.shape[1] == 1 + m + suffix.shape[1]
            and torch.equal(prompts[:, :1], prefix.to(prompts.dtype))
            and torch.equal(prompts[:, 1 + m :], suffix.to(prompts.dtype))
        )
        if not ok:
            raise ValueError(
                f"the {self._peer_name}'s output is not laid out as [SOS] ctx(n_ctx={m}) [class . EOT pad] "
                "(token_prefix, ctx, token_suffix); AnchorOPT can only arrange soft tokens that sit right after "
                "SOS with the class name after them"
            )

    # ------------------------------------------------------------------ anchor branch
    def logit_scale(self) -> torch.Tensor:
        """The CLIP model's ``logit_scale.exp()`` as a float32 scalar (100 when it has none)."""
        scale = getattr(self._clip, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale.detach().float().exp()
        return torch.tensor(100.0)

    def anchor_text_features(self) -> torch.Tensor:
        """Frozen anchor-prompt features ``(C, E)``, float32, L2-normalised; computed once per device / anchors."""
        device = self.anchors.device
        key = (self.template, self.tower.dtype)  # and the anchors' values (a TensorSnapshot: no stale features)
        cache = self._anchor_cache
        if cache is None or cache[0] != key or not cache[1].matches((self.anchors,)):
            with torch.no_grad(), _no_autocast(device), self._busy_scope():
                prompts = self.template.anchor_prompts(self.anchors)
                features = self.template.encode(self.template.anchor, prompts).float()
            self._anchor_cache = (key, TensorSnapshot((self.anchors,)), F.normalize(features, dim=-1))
        return self._anchor_cache[2]

    def anchor_logits(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Anchor-prompt logits ``(B, C)`` (float32, no gradient).

        Args:
            image_features: ``(B, E)``; default: those captured during the model's last forward.
        """
        if image_features is None:
            image_features = self.anchor_image_features()
        text = self.anchor_text_features()
        with torch.no_grad():
            return functional.clip_logits(image_features.detach(), text.to(image_features.device), self.logit_scale())

    def anchor_image_features(self) -> torch.Tensor:
        """Image features the anchor branch uses (the model's own, captured during its forward)."""
        return self.captured_image_features()

    def captured_image_features(self) -> torch.Tensor:
        if self._image_features is None:
            raise RuntimeError(
                "no image features were captured: call the model on a batch first (the shim records the output "
                "of clip_model.visual), or pass image_features= explicitly (e.g. under nn.DataParallel)"
            )
        return self._image_features

    def normal_logits(self) -> torch.Tensor:
        """Normal-prompt logits ``(B, C)`` of the model's last forward, rebuilt from the captured features.

        Equal to the peer's own logits (computed here in float32); differentiable.  Needed where the
        peer's model returns a loss in training (CoCoOp, MaPLe, DePT).
        """
        image = self.captured_image_features()
        texts = self._text_features
        scale = self.logit_scale()
        if not texts:
            raise RuntimeError(
                "no text features were captured during the last forward: pass logits= to loss() "
                "(the shim records clip_model.ln_final's output while the prompt learner's prompts are encoded)"
            )
        if len(texts) == 1:
            return functional.clip_logits(image, texts[0], scale)
        if len(texts) == image.shape[0]:  # CoCoOp: one text pass per image
            return torch.stack([functional.clip_logits(image[i : i + 1], t, scale)[0] for i, t in enumerate(texts)])
        raise RuntimeError(
            f"captured {len(texts)} text passes for {image.shape[0]} images during the last forward; "
            "pass logits= to loss()"
        )

    # ------------------------------------------------------------------ loss and inference
    def loss(
        self,
        labels: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        base_loss: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AnchorOPT's Stage II loss for the batch the model just saw - one call in ``forward_backward``.

        ``ce_weight * CE(logits, labels) + kd_weight * T^2 * KL(ensemble || normal)``, the ensemble
        ``(normal + anchor) / 2`` detached.

        Args:
            labels: ``(B,)`` class indices.
            logits: the model's normal-prompt logits ``(B, C)`` (CoOp's output); default: rebuilt from the
                captured features of the last forward (CoCoOp / MaPLe / DePT return a loss instead).
            base_loss: the peer's own training loss (CoCoOp / MaPLe: its CE; DePT: its CE + linear-probe
                loss); replaces the CE term, weighted by ``ce_weight``.
            image_features: for the anchor logits; default: captured.
        """
        cfg = self.loss_config
        labels = torch.as_tensor(labels)
        need_logits = cfg.kd_weight != 0 or base_loss is None
        normal = None
        if need_logits:
            normal = logits if logits is not None else self.normal_logits()
            if normal.dim() != 2:
                raise ValueError(
                    f"logits must be (B, C) class scores, got shape {tuple(normal.shape)}; a model that returns "
                    "its loss in training goes in base_loss=, not logits="
                )
            labels = labels.to(normal.device)
        if base_loss is not None:
            total = cfg.ce_weight * base_loss.float()
        else:
            total = cfg.ce_weight * F.cross_entropy(normal.float(), labels)
        if cfg.kd_weight:
            anchor = self.anchor_logits(image_features).to(normal.device)
            if anchor.shape != normal.shape:
                raise ValueError(
                    f"anchor logits {tuple(anchor.shape)} and normal logits {tuple(normal.shape)} differ: were the "
                    "image features captured from the same batch?"
                )
            teacher = functional.ensemble_logits(normal.float(), anchor)
            kd = functional.distillation_loss(normal, teacher, cfg.temperature, cfg.kd_normalization)
            total = total + cfg.kd_weight * kd
        return total

    def predict(
        self, logits: torch.Tensor, image_features: torch.Tensor | None = None, mode: str | None = None
    ) -> torch.Tensor:
        """Inference switch: ``"base"`` returns ``logits`` unchanged, ``"novel"`` the float32 ensemble
        ``(logits + anchor_logits) / 2`` (paper: novel classes use the ensemble).

        Args:
            logits: the model's output ``(B, C)`` for the batch it just saw.
            image_features: for the anchor logits; default: captured during that forward.
            mode: overrides :attr:`mode` for this call.
        """
        mode = check_mode(mode or self.mode)
        if mode == "base":
            return logits
        anchor = self.anchor_logits(image_features)
        if anchor.shape != logits.shape:
            raise ValueError(f"anchor logits {tuple(anchor.shape)} and model logits {tuple(logits.shape)} differ")
        return functional.ensemble_logits(logits.float(), anchor.to(logits.device))

    # ------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Detach AnchorOPT: the learner's outputs, ``tokenized_prompts`` and ``state_dict`` are the original
        ones again (an optimizer built meanwhile still holds the position logits)."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for tensor, original in self._id_tensors:
            tensor.copy_(original)
        learner = self._learner
        self._undo_prepare(learner)
        if learner._modules.get(CHILD_NAME) is self:
            del learner._modules[CHILD_NAME]
        object.__setattr__(self, "_learner", None)
        self.clear()
        self._anchor_cache = None
        self._removed = True

    def clear(self) -> None:
        """Forget the features captured during the last forward."""
        self._image_features: torch.Tensor | None = None
        self._visual_args: tuple | None = None
        self._text_features: list[torch.Tensor] = []
        self.last_matrix: torch.Tensor | None = None

    # ------------------------------------------------------------------ capture hooks
    @contextlib.contextmanager
    def _busy_scope(self) -> Iterator[None]:
        """Our own passes through the user's towers are not captured."""
        previous, self._busy = self._busy, True
        try:
            yield
        finally:
            self._busy = previous

    def _visual_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if not self._busy:
            self._visual_args = args

    def _visual_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._busy and isinstance(output, torch.Tensor):
            self._image_features = output

    def _ln_final_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._busy or not isinstance(output, torch.Tensor) or output.dim() != 3:
            return
        if _LAST_LEARNER_RUN.get(id(self._clip)) is not self or id(self._clip) in _EXTERNAL_PASSES:
            return  # another model built on the same CLIP is encoding its prompts, or a fast pass reports them
        if output.shape[0] != self._pool_index.shape[0] or output.shape[1] != self._seq_len:
            return  # not the prompt learner's prompts (another text pass through the same tower)
        dtype = getattr(self._clip, "dtype", output.dtype)
        hidden = output.to(dtype)
        index = self._pool_index.to(hidden.device)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        proj = self.tower.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        self._text_features.append(pooled)

    def _take_text_features(self, features: torch.Tensor) -> None:
        """Features ``(C, E)`` of one text pass over this learner's prompts, from a fast text path."""
        if not self._busy and _LAST_LEARNER_RUN.get(id(self._clip)) is self and features.dim() == 2 \
                and features.shape[0] == self._pool_index.shape[0]:
            self._text_features.append(features)


_EXTERNAL_PASSES: dict[int, int] = {}
"""id(clip_model) -> number of text passes in progress that report their features themselves (accelerate)."""


@contextlib.contextmanager
def text_pass(clip_model: nn.Module) -> Iterator[Callable[[torch.Tensor], None]]:
    """A text pass over ``clip_model``'s tower that computes pooled features without the full-length
    ``ln_final`` output (:func:`anchoropt.adapters.accelerate`): inside it the shims' ``ln_final`` capture is
    off, and ``report(features (C, E))`` hands the pass's features to the injection whose learner ran last."""
    key = id(clip_model)
    _EXTERNAL_PASSES[key] = _EXTERNAL_PASSES.get(key, 0) + 1

    def report(features: torch.Tensor) -> None:
        injection = _LAST_LEARNER_RUN.get(key)
        if injection is not None and not injection.removed:
            injection._take_text_features(features)

    try:
        yield report
    finally:
        _EXTERNAL_PASSES[key] -= 1
        if not _EXTERNAL_PASSES[key]:
            del _EXTERNAL_PASSES[key]


# ---------------------------------------------------------------------- hooks on the prompt learner
_LAST_LEARNER_RUN: "weakref.WeakValueDictionary[int, AnchorOPTInjection]" = weakref.WeakValueDictionary()
"""id(clip_model) -> the injection whose learner ran last on it (two models built on one CLIP share its hooks)."""


def _rewrite_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    injection = module._modules.get(CHILD_NAME)  # the replica's own child under nn.DataParallel
    if not isinstance(injection, AnchorOPTInjection):
        return None
    _LAST_LEARNER_RUN[id(injection._clip)] = injection
    output = injection.with_prompts(output, injection.insert_anchors(injection.prompts_of(output)))
    injection.after_rewrite()
    return output


def _reset_hook(module: nn.Module, args: tuple) -> None:
    injection = module._modules.get(CHILD_NAME)
    if isinstance(injection, AnchorOPTInjection) and not injection._busy:
        injection._text_features = []


# ---------------------------------------------------------------------- helpers
def find(model: nn.Module) -> AnchorOPTInjection:
    """The one AnchorOPT injection inside ``model`` (a ``CustomCLIP``, a prompt learner, a DataParallel)."""
    found = [m for m in model.modules() if isinstance(m, AnchorOPTInjection)]
    if not found:
        raise LookupError(f"no AnchorOPT injection inside this {type(model).__name__}: patch() or wrap() it first")
    if len(found) > 1:
        raise LookupError(f"{len(found)} AnchorOPT injections inside this {type(model).__name__}; pick one")
    return found[0]
