"""Pictures of what AnchorOPT learned: the position matrix (paper Fig. 4) and the anchors' nearest tokens (S4).

* :func:`position_matrix_figure` - the hard assignment used at evaluation (rows: output slots, columns:
  source tokens ``soft1 .. softM, anchor1 .. anchorN``) next to the row-wise softmax of the logits; the
  caption spells out the resulting prompt and which tokens repeat or vanish.
* :func:`nearest_tokens` / :func:`nearest_tokens_figure` - for each anchor, the vocabulary tokens whose
  embedding rows (``token_embedding``) are closest in cosine, decoded with the CLIP BPE decoder.  As the
  paper notes, learned anchors rarely sit near a real word: expect fragments.

matplotlib is an optional dependency (``pip install matplotlib``, or the ``viz`` extra when installing anchoropt),
imported only when a figure is made;
figures are drawn without pyplot (no display needed).  :func:`nearest_tokens` needs no matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _files
from .position import PositionMatrix

__all__ = [
    "position_matrix_figure",
    "save_position_matrix",
    "nearest_tokens",
    "nearest_tokens_figure",
    "save_nearest_tokens",
    "save_run_plots",
    "decode_token",
    "check_matplotlib",
    "MATPLOTLIB_HINT",
]

_SPECIAL = ("<start_of_text>", "<end_of_text>")
MATPLOTLIB_HINT = "the pictures need matplotlib: pip install matplotlib"


def check_matplotlib() -> None:
    """Raise ``ImportError`` with the install hint when matplotlib is missing (before any work is done)."""
    _figure()


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(MATPLOTLIB_HINT) from None
    return Figure(**kwargs)


def _position_parts(source) -> tuple[torch.Tensor, int, int]:
    """(logits (K, K), n_soft, n_anchor) from a PositionMatrix, a module holding one, or ``(logits, n_soft)``."""
    if isinstance(source, PositionMatrix):
        return source.logits.detach().float().cpu(), source.n_soft, source.n_anchor
    position = getattr(source, "position", None)
    if isinstance(position, PositionMatrix):
        return _position_parts(position)
    if isinstance(source, tuple) and len(source) == 2:
        logits, n_soft = source
        logits = torch.as_tensor(logits).detach().float().cpu()
        return logits, int(n_soft), logits.shape[0] - int(n_soft)
    raise TypeError(
        "expected a PositionMatrix, a prompt learner with a .position, or a (logits, n_soft) tuple, "
        f"got {type(source).__name__}"
    )


def _source_names(n_soft: int, n_anchor: int) -> list[str]:
    return [f"soft{i + 1}" for i in range(n_soft)] + [f"anchor{i + 1}" for i in range(n_anchor)]


def position_matrix_figure(source, title: str | None = None, probabilities: bool = True):
    """A matplotlib ``Figure``: the evaluation-time assignment heatmap (and the softmax of the logits).

    Args:
        source: a :class:`~anchoropt.PositionMatrix`, a module with a ``.position`` (the Stage II learner),
            or a ``(logits, n_soft)`` tuple.
        title: figure title.
        probabilities: add the row-wise softmax panel next to the hard assignment.
    """
    logits, n_soft, n_anchor = _position_parts(source)
    size = logits.shape[0]
    hard = F.one_hot(logits.argmax(dim=-1), size).float()
    probs = logits.softmax(dim=-1)
    names = _source_names(n_soft, n_anchor)
    slots = [f"slot {i + 1}" for i in range(size)]
    panels = [("used at test time: argmax", hard, "{:.0f}")]
    if probabilities:
        panels.append(("training picks: softmax(logits)", probs, "{:.2f}"))
    cell = max(0.5, 2.6 / size)  # with the text sizes below, legible when shown ~700 px wide (a docs page)
    fig = _figure(figsize=(len(panels) * (size * cell + 1.6) + 0.4, size * cell + 2.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, values, fmt) in zip(axes, panels):
        ax.imshow(values.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(size), names, rotation=45, ha="right", fontsize=12)
        ax.set_yticks(range(size), slots, fontsize=12)
        ax.set_xlabel("source token", fontsize=12)
        ax.set_ylabel("position in the prompt", fontsize=12)
        ax.set_title(label, fontsize=12)
        ax.axvline(n_soft - 0.5, color="darkorange", lw=1.2, ls="--")  # soft | anchor boundary
        for i in range(size):
            for j in range(size):
                v = float(values[i, j])
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=11,
                        color="white" if v > 0.55 else "black")
    order = [names[int(j)] for j in hard.argmax(dim=-1)]
    used = hard.sum(dim=0)
    repeated = [f"{names[j]} x{int(used[j])}" for j in range(size) if used[j] > 1]
    dropped = [names[j] for j in range(size) if used[j] == 0]
    caption = "prompt: [SOS] " + " ".join(order) + " {class} . [EOT]"
    notes = []
    if repeated:
        notes.append("repeated: " + ", ".join(repeated))
    if dropped:
        notes.append("dropped: " + ", ".join(dropped))
    if n_anchor and all(name in dropped for name in names[n_soft:]):
        notes.append("NO ANCHOR PLACED: the test-time prompt holds soft tokens only")
    fig.suptitle(title or "AnchorOPT position matrix", fontsize=14)
    fig.supxlabel(caption + ("\n" + "; ".join(notes) if notes else ""), fontsize=12)
    return fig


def save_position_matrix(source, path: str | os.PathLike, title: str | None = None, dpi: int = 150) -> Path:
    """Write :func:`position_matrix_figure` to a PNG file."""
    return _files.save_figure(position_matrix_figure(source, title), path, dpi=dpi, bbox_inches="tight",
                              pad_inches=0.1)


def decode_token(tokenizer, token_id: int) -> str:
    """One vocabulary entry as text; a CLIP BPE piece that does not end a word gets a trailing ``-``."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    decoder, byte_decoder = getattr(inner, "decoder", None), getattr(inner, "byte_decoder", None)
    if isinstance(decoder, dict) and isinstance(byte_decoder, dict):
        piece = decoder.get(int(token_id))
        if piece is None:
            return f"#{token_id}"
        if piece in _SPECIAL:
            return piece
        word_end = piece.endswith("</w>")
        text = bytearray(byte_decoder.get(c, ord("?")) for c in piece.removesuffix("</w>"))
        return text.decode("utf-8", errors="replace") + ("" if word_end else "-")
    if hasattr(inner, "convert_ids_to_tokens"):  # Hugging Face tokenizers (SigLIP & co)
        return str(inner.convert_ids_to_tokens(int(token_id)))
    return f"#{token_id}"


@torch.no_grad()
def nearest_tokens(
    anchors: torch.Tensor,
    model: nn.Module,
    tokenizer=None,
    k: int = 10,
) -> list[dict[str, Any]]:
    """For each anchor ``(N, D)``, the ``k`` vocabulary tokens with the highest cosine similarity.

    Args:
        anchors: Stage I anchors (or a module with ``.anchors``, e.g. the Stage II learner).
        model: the CLIP whose ``token_embedding`` the anchors live in (any model :class:`TextTower` accepts).
        tokenizer: decodes token ids; the CLIP BPE tokenizer by default.

    Returns:
        One dict per anchor: ``{"anchor": i, "norm": ||a||, "mean_token_norm": ..., "tokens": [{"id",
        "token", "cosine"}, ...]}``.
    """
    from .template import default_tokenizer
    from .towers import TextTower

    if isinstance(anchors, nn.Module):
        anchors = anchors.anchors
    anchors = torch.as_tensor(anchors).detach().float()
    if anchors.dim() == 1:
        anchors = anchors[None]
    table = TextTower.from_model(model).token_embedding.weight.detach().float()
    if anchors.shape[-1] != table.shape[1]:
        raise ValueError(f"anchors have width {anchors.shape[-1]} but the token embedding has {table.shape[1]}")
    tokenizer = tokenizer or default_tokenizer()
    anchors = anchors.to(table.device)
    cosine = F.normalize(anchors, dim=-1) @ F.normalize(table, dim=-1).t()
    top = cosine.topk(min(k, table.shape[0]), dim=-1)
    mean_norm = float(table.norm(dim=-1).mean())
    out = []
    for i in range(anchors.shape[0]):
        tokens = [{"id": int(j), "token": decode_token(tokenizer, int(j)), "cosine": round(float(c), 4)}
                  for c, j in zip(top.values[i], top.indices[i])]
        out.append({"anchor": i + 1, "norm": round(float(anchors[i].norm()), 4),
                    "mean_token_norm": round(mean_norm, 4), "tokens": tokens})
    return out


def nearest_tokens_figure(neighbours: Sequence[dict], title: str | None = None):
    """Horizontal bars of each anchor's nearest tokens (the output of :func:`nearest_tokens`)."""
    n = len(neighbours)
    k = max(len(item["tokens"]) for item in neighbours)
    fig = _figure(figsize=(max(4.2 * n + 0.6, 6.0), 0.32 * k + 1.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, item in zip(axes, neighbours):
        tokens = item["tokens"][::-1]
        labels = [f"{_printable(repr(t['token']))}  #{t['id']}" for t in tokens]  # escape once, after repr
        values = [t["cosine"] for t in tokens]
        ax.barh(range(len(tokens)), values, color="tab:blue")
        ax.set_yticks(range(len(tokens)), labels, fontsize=8)
        ax.set_xlabel("cosine similarity to the anchor")
        low = min(0.0, min(values))
        ax.set_xlim(low, max(1e-3, max(values)) * 1.15)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
        # two short lines: one long title line is cut at the figure's right edge
        ax.set_title(f"anchor {item['anchor']}\nnorm {item['norm']:.2f} (mean token norm "
                     f"{item['mean_token_norm']:.2f})", fontsize=9)
    fig.suptitle(title or "nearest vocabulary tokens of the learned anchors", fontsize=11)
    fig.supxlabel("a trailing '-' marks a word piece that does not end a word", fontsize=8)
    return fig


def _printable(text: str) -> str:
    """Escape characters the default font lacks (emoji, CJK ...) so every label renders."""
    return "".join(ch if ord(ch) < 0x2000 else ch.encode("unicode_escape").decode("ascii") for ch in text)


def save_nearest_tokens(neighbours: Sequence[dict], path: str | os.PathLike, title: str | None = None,
                        dpi: int = 150) -> Path:
    """Write :func:`nearest_tokens_figure` to a PNG file."""
    return _files.save_figure(nearest_tokens_figure(neighbours, title), path, dpi=dpi)


def save_run_plots(learner: nn.Module, model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                   k: int = 10, note: str | None = None) -> dict[str, str]:
    """``position_matrix.png``, ``anchor_tokens.png`` and ``anchor_tokens.json`` for a trained learner.

    Args:
        note: added to both figure titles, e.g. ``"RANDOM WEIGHTS"`` for a model without pretrained weights.
    """
    check_matplotlib()  # no matplotlib: fail before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = f"\n{note}" if note else ""
    paths = {"position_matrix": str(save_position_matrix(learner, directory / "position_matrix.png",
                                                         title="AnchorOPT position matrix" + suffix))}
    neighbours = nearest_tokens(learner.anchors, model, tokenizer, k=k)
    _files.write_json(directory / "anchor_tokens.json", neighbours)
    paths["anchor_tokens"] = str(save_nearest_tokens(
        neighbours, directory / "anchor_tokens.png", title="nearest vocabulary tokens of the learned anchors" + suffix))
    paths["anchor_tokens_json"] = str(directory / "anchor_tokens.json")
    return paths
