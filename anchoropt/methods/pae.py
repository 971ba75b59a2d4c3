"""PAE's Koopman-Lyapunov regulariser for deep prompts (arXiv 2601.20232, ICLR 2026), prompt-agnostic.

A chain of per-layer prompts ``[P_1 .. P_J]`` (each ``(T, width)``) is lifted by ``U`` (``width -> Z``, no
bias): ``z_i = P_i U``.  One Koopman operator ``K`` (identity at start; or one per layer pair) predicts the
next layer, ``z_i K ~ z_{i+1}``, and a learnable energy ``Q = L^T L`` (spectrally normalised; one shared ``L``,
or one per layer pair as the release's layerwise mode: ``energy="per_pair"``) penalises energy growth.  Loss added to the task loss::

    alpha * L_koopman + beta * L_lyapunov           (alpha = 0.5, beta = 0.2: the paper's run)

Parameter-only: it does not see images and changes nothing at inference (the prompts are used exactly as
before; ``U``, ``K``, ``L`` only shape them during training).  Plug-in points:

* the deep AnchorOPT learner: :func:`prompt_chain` ``(learner)`` -> its per-layer soft prompts
  ``deep.prompts[0 .. depth-1]`` (the carried anchors are frozen and not in the chain; the input layer's
  soft tokens are not in it either, as in PAE's code, unless ``include_input=True``);
* MaPLe (also with AnchorOPT injected): its text ``compound_prompts_text``; ``side="visual"`` gives the
  projected visual deep prompts (a second regulariser of the visual width);
* anything else: call the module on a list of ``(T, width)`` tensors or a ``(J, T, width)`` tensor.

Released-code facts kept (``../shared/reference/pae_atprompt.md`` §1.3-1.5, ``reading="released"``, the
default): MSE-mean Koopman term per pair; row-normalised current and **predicted** states, softplus of the
energy increase, ``10 tanh(x / 10)``; own gradient clipping (``max_norm=10``, :meth:`KoopmanLyapunov.clip_grad_`).
``reading="paper"`` takes the paper's formulas instead (Frobenius sum; hinge on the actual consecutive
states).  Optimiser: :func:`optimizer_groups` puts ``U, K, L`` in their own group with no weight decay
(``decay_pae=True``: the released SGD path, which decays them like the prompts).

Axes: ``J`` layers in the chain, ``T`` prompts per layer, ``W`` prompt width, ``Z`` lifted width.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import nn

from .. import functional as Fn

__all__ = [
    "KoopmanLyapunov", "PAETerms", "MODES", "ENERGIES", "prompt_chain", "optimizer_groups", "pae_loss", "attach", "regularization",
]

MODES = ("global", "layerwise")
ENERGIES = ("shared", "per_pair")
SIDES = ("text", "visual")


class PAETerms(NamedTuple):
    """What :class:`KoopmanLyapunov` returns: the unweighted terms and ``alpha * koopman + beta * lyapunov``."""

    koopman: torch.Tensor
    lyapunov: torch.Tensor
    total: torch.Tensor


class KoopmanLyapunov(nn.Module):
    """The lift ``U``, Koopman operator(s) ``K`` and energy factor ``L`` of PAE, applied to a prompt chain.

    Args:
        width: prompt width ``W`` (512 for a ViT-B text tower, 768 for its vision tower).
        dim: lifted width ``Z`` (256: the paper's choice and ``run.sh``; the config default is 1024).
        mode: ``"global"`` (one shared ``K``, the paper's choice) or ``"layerwise"`` (one per layer pair;
            needs ``n_layers``).
        alpha, beta: weights of the Koopman and Lyapunov terms in :attr:`PAETerms.total`.
        n_layers: chain length ``J``; required for ``"layerwise"``, checked on every call when given.
        reading: ``"released"`` (PAE's code, default) or ``"paper"`` (the paper's formulas); see
            :func:`anchoropt.functional.lyapunov_loss`.
        cap: the released reading's soft cap of each pair's Lyapunov penalty (10).
        energy: ``"shared"`` (default: one ``L``, so one ``Q``, for every layer pair) or ``"per_pair"`` (one ``L``
            per layer pair, each pair's energy from its own ``Q_i = L_i^T L_i / ||L_i^T L_i||_2``; needs
            ``n_layers``).  The release's ``layerwise`` mode keeps one ``L`` per pair (``L_layers[i]`` next to
            ``K_layers[i]``); ``mode="layerwise", energy="per_pair"`` is that mode exactly.  Equal to the shared
            ``L`` only until the first step (every ``L_i`` starts at the identity).

    Example:
        >>> reg = KoopmanLyapunov(width=16, dim=8)
        >>> terms = reg([torch.randn(4, 16) for _ in range(3)])
        >>> terms.total.shape
        torch.Size([])
    """

    def __init__(
        self,
        width: int,
        dim: int = 256,
        mode: str = "global",
        alpha: float = 0.5,
        beta: float = 0.2,
        n_layers: int | None = None,
        reading: str = "released",
        cap: float = 10.0,
        device=None,
        energy: str = "shared",
    ):
        super().__init__()
        _check_positive_int("width", width)
        _check_positive_int("dim", dim)
        if mode not in MODES:
            raise ValueError(f"unknown Koopman mode {mode!r}; choose one of {MODES}")
        if n_layers is not None:
            _check_positive_int("n_layers", n_layers, minimum=2)
        if mode == "layerwise" and n_layers is None:
            raise ValueError("mode='layerwise' holds one operator per layer pair: pass n_layers (the chain length)")
        if energy not in ENERGIES:
            raise ValueError(f"unknown energy {energy!r}; choose one of {ENERGIES}")
        if energy == "per_pair" and n_layers is None:
            raise ValueError("energy='per_pair' holds one L per layer pair: pass n_layers (the chain length)")
        Fn._check_reading(reading)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if cap <= 0:
            raise ValueError(f"cap must be > 0, got {cap}")
        self.width, self.dim, self.mode, self.n_layers, self.energy_mode = width, dim, mode, n_layers, energy
        self.alpha, self.beta, self.reading, self.cap = float(alpha), float(beta), reading, float(cap)
        self.lift = nn.Linear(width, dim, bias=False, device=device)  # U (PyTorch's default Linear init, as released)
        eye = torch.eye(dim, device=device)
        self.operator = nn.Parameter(eye.clone() if mode == "global" else eye.repeat(n_layers - 1, 1, 1))
        # L (Z, Z), or one per pair (J-1, Z, Z); Q = L^T L / ||L^T L||_2
        self.energy = nn.Parameter(eye.clone() if energy == "shared" else eye.repeat(n_layers - 1, 1, 1))

    # ------------------------------------------------------------------ the terms
    def lifted(self, prompts: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``z = P U``: ``(J, T, Z)`` (float32 or the lift's dtype) for a chain ``[(T, W)] * J``."""
        chain = _stack_chain(prompts, self.width)
        if self.n_layers is not None and chain.shape[0] != self.n_layers:
            raise ValueError(f"this regulariser was built for chains of {self.n_layers} layers, got {chain.shape[0]}")
        return self.lift(chain.to(device=self.lift.weight.device, dtype=self.lift.weight.dtype))

    def q(self) -> torch.Tensor:
        """The energy matrix ``Q = L^T L / ||L^T L||_2``: ``(Z, Z)``, or ``(J-1, Z, Z)`` with ``energy="per_pair"``."""
        return Fn.stable_q(self.energy)

    def forward(self, prompts: Sequence[torch.Tensor] | torch.Tensor) -> PAETerms:
        """The terms for one chain ``[(T, W)] * J`` (``J >= 2``) or a ``(J, T, W)`` tensor."""
        z = self.lifted(prompts)
        koopman = Fn.koopman_loss(z, self.operator, self.reading)
        lyapunov = Fn.lyapunov_loss(z, self.operator, self.q(), self.reading, self.cap)
        return PAETerms(koopman, lyapunov, self.alpha * koopman + self.beta * lyapunov)

    # ------------------------------------------------------------------ training helpers
    def clip_grad_(self, max_norm: float = 10.0) -> torch.Tensor:
        """Clip the gradients of ``U, K, L`` on their own (the released trainer: ``max_norm=10``); total norm."""
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    @torch.no_grad()
    def spectral_radius(self) -> float:
        """Largest ``|eigenvalue|`` of ``K`` (of any ``K`` in layerwise mode); the paper reports ``< 1``."""
        ops = self.operator if self.operator.dim() == 3 else self.operator[None]
        return float(torch.linalg.eigvals(ops.double()).abs().max())

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able), to rebuild the module next to its saved tensors."""
        return dict(width=self.width, dim=self.dim, mode=self.mode, alpha=self.alpha, beta=self.beta,
                    n_layers=self.n_layers, reading=self.reading, cap=self.cap, energy=self.energy_mode)

    def extra_repr(self) -> str:
        return f"width={self.width}, dim={self.dim}, mode={self.mode!r}, alpha={self.alpha}, beta={self.beta}, " \
               f"reading={self.reading!r}, energy={self.energy_mode!r}"


# ---------------------------------------------------------------------- plug-in points
def prompt_chain(source: Any, side: str = "text", include_input: bool = False) -> list[torch.Tensor]:
    """The per-layer prompt chain ``[(T, W)] * J`` PAE regularises, for a learner or a list of tensors.

    Args:
        source: an :class:`~anchoropt.AnchorOPTPromptLearner` with ``deep_depth > 0`` (its soft prompts of
            blocks ``1 .. depth``; anchors are frozen and not in the chain); a MaPLe ``MultiModalPromptLearner``
            (or AnchorOPT's MaPLe injection, or a model holding one as ``.prompt_learner``): its
            ``compound_prompts_text``; a sequence of ``(T, W)`` tensors or a ``(J, T, W)`` tensor (as is).
        side: ``"visual"`` for MaPLe: ``compound_prompt_projections[i](compound_prompts_text[i])``, the
            visual deep prompts MaPLe derives from the text ones (differentiable).
        include_input: also put the input layer's prompts first (the learner's ``soft`` / MaPLe's ``ctx``,
            or ``proj(ctx)`` on the visual side).  PAE's code leaves the input layer out.
    """
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose one of {SIDES}")
    if isinstance(source, torch.Tensor) or (isinstance(source, (list, tuple)) and all(
            isinstance(t, torch.Tensor) for t in source)):
        if side != "text" or include_input:
            raise ValueError("side= and include_input= apply to learners; a list of tensors is used as given")
        return list(source)
    deep = getattr(source, "deep", None)
    if hasattr(source, "soft") and hasattr(source, "deep_hooks"):  # the deep AnchorOPT learner
        if deep is None:
            raise ValueError("this AnchorOPT learner is shallow (deep_depth=0): PAE regularises per-layer deep "
                             "prompts, build it with deep_depth >= 2")
        if side != "text":
            raise ValueError("the AnchorOPT learner has text prompts only (side='text')")
        return ([source.soft] if include_input else []) + list(deep.prompts.unbind(0))
    maple = _maple_learner(source)
    if maple is None:
        raise TypeError(
            f"cannot find per-layer prompts in a {type(source).__name__}: pass a deep AnchorOPTPromptLearner, a "
            "MaPLe MultiModalPromptLearner, or a list of (T, width) tensors"
        )
    text = list(maple.compound_prompts_text)
    if side == "text":
        return ([maple.ctx] if include_input else []) + text
    visual = [layer(text[i]) for i, layer in enumerate(maple.compound_prompt_projections)]
    return ([maple.proj(maple.ctx)] if include_input else []) + visual


def _maple_learner(source: Any) -> nn.Module | None:
    """MaPLe's prompt learner: ``source`` itself, or its ``.prompt_learner`` (an AnchorOPT injection, CustomCLIP)."""
    for candidate in (source, getattr(source, "prompt_learner", None)):
        if candidate is not None and hasattr(candidate, "compound_prompts_text") and hasattr(candidate, "ctx"):
            return candidate
    return None


def attach(module: nn.Module, side: str = "text", include_input: bool = False, **options: Any) -> KoopmanLyapunov:
    """Build a regulariser for ``module``'s chain and register it as the child ``module.pae`` (``pae_visual``).

    For peers whose trainers freeze, optimise and checkpoint by module name (MaPLe: everything under
    ``prompt_learner``): call it on the prompt learner before the trainer builds its optimiser, then add
    :func:`regularization` ``(prompt_learner)`` to the loss.  Width and chain length are read from the chain;
    ``options`` go to :class:`KoopmanLyapunov` (``dim``, ``mode``, ``alpha``, ``beta``, ``reading``).
    Not for :class:`~anchoropt.AnchorOPTPromptLearner` (its saved files hold the prompts only): keep the
    regulariser next to it, as the runner does.
    """
    if hasattr(module, "soft") and hasattr(module, "deep_hooks"):
        raise TypeError("keep PAE next to an AnchorOPTPromptLearner (reg = KoopmanLyapunov(...); "
                        "reg(prompt_chain(learner))), not inside it: its save files hold the prompts only")
    name = "pae" if side == "text" else "pae_visual"
    if hasattr(module, name):
        raise RuntimeError(f"{type(module).__name__} already has a child {name!r}")
    chain = prompt_chain(module, side=side, include_input=include_input)
    if len(chain) < 2:
        raise ValueError(f"PAE needs at least 2 per-layer prompts on the {side} side, this learner has {len(chain)}")
    regularizer = KoopmanLyapunov(chain[0].shape[-1], n_layers=len(chain), device=chain[0].device, **options)
    regularizer._chain_options = {"side": side, "include_input": include_input}
    module.add_module(name, regularizer)
    return regularizer


def regularization(module: nn.Module) -> torch.Tensor:
    """Sum of the ``total`` of every regulariser :func:`attach` put on ``module`` (text and visual)."""
    regs = [r for r in (getattr(module, "pae", None), getattr(module, "pae_visual", None)) if r is not None]
    if not regs:
        raise RuntimeError(f"no PAE regulariser attached to this {type(module).__name__}: call anchoropt.methods.pae.attach first")
    return sum(r(prompt_chain(module, **getattr(r, "_chain_options", {}))).total for r in regs)


def pae_loss(prompts: Sequence[torch.Tensor] | torch.Tensor | Any, regularizer: KoopmanLyapunov) -> torch.Tensor:
    """``alpha * L_koopman + beta * L_lyapunov`` for a chain (or a learner: :func:`prompt_chain`)."""
    return regularizer(prompt_chain(prompts)).total


def optimizer_groups(
    prompt_params: Iterable[nn.Parameter],
    regularizer: KoopmanLyapunov | Sequence[KoopmanLyapunov],
    weight_decay: float,
    decay_pae: bool = False,
) -> list[dict]:
    """Parameter groups: the prompts with ``weight_decay``, PAE's ``U, K, L`` in their own group.

    ``decay_pae=False`` (default) gives ``U, K, L`` no weight decay (the released AdamW branch; decay pulls
    ``K`` and ``L`` from the identity towards 0).  ``decay_pae=True`` decays them like the prompts, as the
    released SGD path (``run.sh``) does.  Both groups take the optimiser's base learning rate, as released.
    """
    regs = [regularizer] if isinstance(regularizer, nn.Module) else list(regularizer)
    pae = [p for reg in regs for p in reg.parameters() if p.requires_grad]
    return [
        {"params": [p for p in prompt_params if p.requires_grad], "weight_decay": weight_decay},
        {"params": pae, "weight_decay": weight_decay if decay_pae else 0.0, "name": "pae"},
    ]


# ---------------------------------------------------------------------- helpers
def _stack_chain(prompts: Sequence[torch.Tensor] | torch.Tensor, width: int) -> torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        chain = prompts
    else:
        prompts = list(prompts)
        shapes = {tuple(t.shape) for t in prompts if isinstance(t, torch.Tensor)}
        if len(prompts) == 0 or len(shapes) != 1 or any(not isinstance(t, torch.Tensor) for t in prompts):
            raise ValueError(f"a prompt chain is a list of same-shape (T, {width}) tensors; got shapes {sorted(shapes)}")
        chain = torch.stack([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in prompts])
    if chain.dim() != 3 or chain.shape[-1] != width or chain.shape[0] < 2:
        raise ValueError(
            f"PAE needs a chain of J >= 2 per-layer prompts (J, T, {width}); got {tuple(chain.shape)} "
            "(a deep learner needs deep_depth >= 2)"
        )
    return chain


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
