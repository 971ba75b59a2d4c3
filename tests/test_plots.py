"""The grid's HM chart is honest and readable: axis from 0, error bars clipped at 0, one look per method, a title."""

from __future__ import annotations

import json

import pytest

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.figure  # noqa: E402

from anchoropt.runner import tables  # noqa: E402

METHODS = ["zeroshot", "coop", "coop+atprompt", "coop+anchoropt", "cocoop", "cocoop+atprompt", "cocoop+anchoropt",
           "maple", "maple+atprompt", "maple+anchoropt", "dept", "dept+atprompt", "dept+anchoropt"]


@pytest.fixture
def drawn(monkeypatch):
    """The figures ``savefig`` is called on (captured before the plot closes them)."""
    figures = []
    save = matplotlib.figure.Figure.savefig

    def capture(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    return figures


def test_every_method_looks_different():
    for methods in (METHODS[:5], METHODS, [f"m{i}" for i in range(25)]):
        styles = tables._styles(methods)
        assert len(set(styles.values())) == len(methods), methods
    few = tables._styles(METHODS[:5])
    assert len({colour for colour, _ in few.values()}) == 5  # up to 10 methods: colours alone
    many = tables._styles(METHODS)
    assert many["coop"][0] == many["coop+anchoropt"][0] != many["maple"][0]  # colour: the base method
    assert many["coop+anchoropt"][1] == many["dept+anchoropt"][1] != many["dept"][1]  # hatch: the variant


def test_axis_from_zero_error_bars_clipped_title(tmp_path, drawn):
    stats = {"a": [(80.0, 2.0), (3.0, 5.0)], "b": [(60.0, 1.0), (99.0, 4.0)]}
    tables.draw_bars(["g0", "g1"], stats, tmp_path / "hm.png", title="toy-clip, 16 shots, seeds 1, 2, 3")
    assert (tmp_path / "hm.png").is_file()
    ax = drawn[-1].axes[0]
    assert ax.get_ylim()[0] == 0.0
    assert ax.get_title() == "toy-clip, 16 shots, seeds 1, 2, 3"
    ends = [y for collection in ax.collections for segment in collection.get_segments() for _, y in segment]
    assert min(ends) == pytest.approx(0.0) and max(ends) == pytest.approx(100.0)  # 3 - 5 -> 0, 99 + 4 -> 100
    assert len(drawn[-1].legends[0].get_texts()) == 2


def test_grid_plot_title_names_model_shots_protocol_seeds(tmp_path, drawn):
    run = tmp_path / "runs" / "g0" / "coop" / "seed1"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"model": "ViT-B-16", "pretrained": "openai", "shots": 16}))
    records = [{"method": m, "dataset": "g0", "seed": s, "protocol": "base2novel", "base": 80.0, "novel": 70.0,
                "hm": 74.7} for m in ("zeroshot", "coop") for s in (1, 2, 3)]
    tables.plot_hm(records, tmp_path / "hm.png")
    assert drawn[-1].axes[0].get_title() == "ViT-B-16 (openai), 16 shots, base-to-novel, seeds 1, 2, 3"
