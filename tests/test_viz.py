"""anchoropt.viz: the position-matrix heatmap (paper Fig. 4) and the anchors' nearest tokens (paper S4)."""

from __future__ import annotations

import json

import pytest
import torch

from anchoropt import AnchorOPTPromptLearner, PositionMatrix, viz
from anchoropt.towers import TextTower

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fixed_position() -> PositionMatrix:
    """4 soft + 1 anchor; slots pick soft2, anchor1, soft2, soft4, soft1 (soft3 dropped, soft2 repeated)."""
    position = PositionMatrix(4, 1)
    with torch.no_grad():
        position.logits.fill_(-2.0)
        for slot, source in enumerate([1, 4, 1, 3, 0]):
            position.logits[slot, source] = 3.0
    return position


def test_nearest_tokens_finds_the_exact_word(open_clip_model, tokenizer):
    table = TextTower.from_model(open_clip_model).token_embedding.weight
    dog, photo_piece = tokenizer.encoder["dog</w>"], tokenizer.encoder["photo"]
    anchors = torch.stack([table[dog], table[photo_piece] * 3.0])  # the norm does not matter to the cosine
    found = viz.nearest_tokens(anchors, open_clip_model, tokenizer, k=3)
    assert [item["anchor"] for item in found] == [1, 2]
    assert found[0]["tokens"][0] == {"id": dog, "token": "dog", "cosine": pytest.approx(1.0, abs=1e-4)}
    assert found[1]["tokens"][0]["token"] == "photo-"  # a word piece that does not end a word
    assert found[1]["norm"] == pytest.approx(float(table[photo_piece].norm() * 3), rel=1e-3)
    assert len(found[0]["tokens"]) == 3 and found[0]["tokens"][0]["cosine"] >= found[0]["tokens"][1]["cosine"]
    with pytest.raises(ValueError, match="width"):
        viz.nearest_tokens(torch.zeros(1, 7), open_clip_model, tokenizer)


def test_decode_token_special_and_unknown(tokenizer):
    assert viz.decode_token(tokenizer, 49406) == "<start_of_text>"
    assert viz.decode_token(tokenizer, 10 ** 7) == "#10000000"
    assert viz.decode_token(object(), 5) == "#5"


def test_position_matrix_figure_reads_like_fig4(tmp_path):
    pytest.importorskip("matplotlib")
    fig = viz.position_matrix_figure(_fixed_position(), title="toy")
    left = fig.axes[0]
    assert [t.get_text() for t in left.get_xticklabels()] == ["soft1", "soft2", "soft3", "soft4", "anchor1"]
    assert [t.get_text() for t in left.get_yticklabels()] == [f"slot {i}" for i in range(1, 6)]
    cells = [t.get_text() for t in left.texts]
    assert cells.count("1") == 5 and cells.count("0") == 20  # one-hot rows
    caption = fig.get_supxlabel()
    assert "[SOS] soft2 anchor1 soft2 soft4 soft1 {class}" in caption
    assert "repeated: soft2 x2" in caption and "dropped: soft3" in caption
    path = viz.save_position_matrix(_fixed_position(), tmp_path / "sub" / "pm.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_figures_from_a_learner_and_from_logits(open_clip_model, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    learner = AnchorOPTPromptLearner(open_clip_model, ["cat", "dog"], torch.randn(1, 64) * 0.02, n_soft=2,
                                     tokenizer=tokenizer)
    assert len(viz.position_matrix_figure(learner).axes) == 2
    assert len(viz.position_matrix_figure((torch.eye(3), 2), probabilities=False).axes) == 1
    with pytest.raises(TypeError, match="PositionMatrix"):
        viz.position_matrix_figure(torch.eye(3))
    paths = viz.save_run_plots(learner, open_clip_model, tmp_path / "plots", tokenizer=tokenizer, k=4)
    assert set(paths) == {"position_matrix", "anchor_tokens", "anchor_tokens_json"}
    neighbours = json.loads((tmp_path / "plots" / "anchor_tokens.json").read_text())
    assert len(neighbours) == 1 and len(neighbours[0]["tokens"]) == 4
    assert (tmp_path / "plots" / "anchor_tokens.png").read_bytes()[:8] == PNG_MAGIC


def test_nearest_tokens_figure_escapes_glyphs_the_font_lacks():
    pytest.importorskip("matplotlib")
    neighbours = [{"anchor": 1, "norm": 1.0, "mean_token_norm": 0.5,
                   "tokens": [{"id": 1, "token": "heart\U0001F495", "cosine": 0.5},
                              {"id": 2, "token": "café", "cosine": -0.1}]}]
    fig = viz.nearest_tokens_figure(neighbours)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any("\\U0001f495" in label for label in labels) and any("café" in label for label in labels)


def test_token_labels_are_escaped_once():
    """An emoji shows as ``'\\U0001f44f'`` (one backslash), not repr's doubled ``'\\\\U0001f44f'``."""
    pytest.importorskip("matplotlib")
    neighbours = [{"anchor": 1, "norm": 1.0, "mean_token_norm": 0.5,
                   "tokens": [{"id": 7, "token": "\U0001f44f", "cosine": 0.5}]}]
    (label,) = [t.get_text() for t in viz.nearest_tokens_figure(neighbours).axes[0].get_yticklabels()]
    assert label == "'\\U0001f44f'  #7"


def _texts_outside(fig) -> list[str]:
    """What of a rendered figure reaches past its edges: the titles, or an axes with its labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer, box = canvas.get_renderer(), fig.bbox
    parts = [(t.get_text(), t.get_window_extent(renderer)) for t in (fig._suptitle, fig._supxlabel)
             if t is not None and t.get_text()]
    parts += [(ax.get_title(), ax.get_tightbbox(renderer)) for ax in fig.axes]
    return [name for name, e in parts
            if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1]


def test_titles_and_labels_fit_inside_the_figures(open_clip_model, tokenizer):
    pytest.importorskip("matplotlib")
    neighbours = [{"anchor": 1, "norm": 123.45, "mean_token_norm": 0.39,
                   "tokens": [{"id": i, "token": w, "cosine": 0.1 * i} for i, w in
                              enumerate(["\U0001f3fb\u200d\u2642\ufe0f", "calculated", "renamed-"])]}]
    title = "nearest vocabulary tokens of the learned anchors\nRANDOM WEIGHTS: this picture means nothing"
    assert _texts_outside(viz.nearest_tokens_figure(neighbours, title)) == []
    assert _texts_outside(viz.position_matrix_figure(_fixed_position(), title)) == []


def test_run_plots_carry_the_note(open_clip_model, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    learner = AnchorOPTPromptLearner(open_clip_model, ["cat", "dog"], torch.randn(1, 64) * 0.02, n_soft=2,
                                     tokenizer=tokenizer)
    titles = []
    original = viz.nearest_tokens_figure
    monkeypatch.setattr(viz, "nearest_tokens_figure", lambda n, title=None: titles.append(title) or original(n, title))
    viz.save_run_plots(learner, open_clip_model, tmp_path, tokenizer=tokenizer, k=2, note="RANDOM WEIGHTS")
    assert titles and titles[0].endswith("\nRANDOM WEIGHTS")


def test_missing_matplotlib_is_one_clear_error_and_writes_nothing(open_clip_model, tokenizer, tmp_path,
                                                                   monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    learner = AnchorOPTPromptLearner(open_clip_model, ["cat", "dog"], torch.randn(1, 64) * 0.02, n_soft=2,
                                     tokenizer=tokenizer)
    with pytest.raises(ImportError) as info:
        viz.save_run_plots(learner, open_clip_model, tmp_path / "plots", tokenizer=tokenizer)
    assert str(info.value) == viz.MATPLOTLIB_HINT and info.value.__cause__ is None
    assert info.value.__suppress_context__ and not (tmp_path / "plots").exists()
