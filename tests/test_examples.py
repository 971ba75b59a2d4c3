"""Every script in examples/ runs offline as written (in-process, from a scratch directory), and the README's
"Use it" snippet runs as a doctest on a tiny tower."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> (argv, a line it must print)
CASES = {
    "quickstart.py": (["--stage1-steps", "5", "--epochs", "1", "--coop-epochs", "1", "--shots", "4",
                       "--toy-classes", "6"],
                      r"zero-shot .*: base .*% \| novel .*%(.|\n)*\nCoOp: base .*% \| novel .*%(.|\n)*\n"
                      r"CoOp\+AnchorOPT: base .*% \| novel .*% \| HM .*toy world\]\nshows: CoOp\+AnchorOPT's HM is "),
    "open_clip_training.py": (["--epochs", "1", "--stage1-steps", "3"], r"base .*% \| novel .*% on 16 test images"),
    "coop_wrap.py": ([], r"predictions \(base / novel\): \[.*\] \[.*\]"),
    "building_blocks.py": ([], r"arrangement \(slot -> source\): \['\w+', '\w+', '\w+'\]"),
    "deep_variant.py": ([], r"novel logits: \(4, 2\)"),
    "base_to_novel.py": ([], r"base logits after the round trip identical: True"),
    "methods_on_open_clip.py": (["--epochs", "1", "--stage1-steps", "5", "--classes", "6"],
                                r"maple\+anchoropt: base .*% \| novel .*% \| HM .*toy-world figures"),
    "released_anchors.py": ([], r"(anchor-prompt features: \(3, 512\)|skipped: no released checkpoint)"),
}


def _run(script: Path, argv: list[str], monkeypatch, tmp_path, capsys) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    state = torch.random.get_rng_state()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{script.name} exited with {exit_.code}"
    finally:
        torch.random.set_rng_state(state)
    return capsys.readouterr().out


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_offline(name, monkeypatch, tmp_path, capsys):
    argv, expected = CASES[name]
    out = _run(EXAMPLES / name, argv, monkeypatch, tmp_path, capsys)
    assert re.search(expected, out), out[-2000:]
    # every offline example says what its numbers mean: nothing (random weights) or only inside the toy world
    assert "RANDOM WEIGHTS" in out or "toy-world figures" in out or "skipped" in out


@pytest.mark.parametrize("name", ["open_clip_training.py", "methods_on_open_clip.py"])
def test_examples_write_nothing_into_the_current_folder(name, monkeypatch, tmp_path, capsys):
    argv, expected = CASES[name]
    _run(EXAMPLES / name, argv, monkeypatch, tmp_path, capsys)
    assert list(tmp_path.iterdir()) == []  # their files went to a temporary --output, removed at the end


def test_an_example_refuses_an_existing_output_folder(monkeypatch, tmp_path, capsys):
    mine = tmp_path / "toy_world"
    mine.mkdir()
    (mine / "my_notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["methods_on_open_clip.py", "--output", str(mine), "--epochs", "1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / "methods_on_open_clip.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["my_notes.txt"]


def test_an_example_keeps_what_it_writes_under_a_given_output(monkeypatch, tmp_path, capsys):
    out = _run(EXAMPLES / "open_clip_training.py", ["--epochs", "1", "--stage1-steps", "3", "--output", "kept"],
               monkeypatch, tmp_path, capsys)
    assert (tmp_path / "kept" / "anchoropt").is_dir() and (tmp_path / "kept" / "images" / "train").is_dir()
    assert "learner saved to kept" in out


def test_quickstart_random_flag_runs_the_random_tower(monkeypatch, tmp_path, capsys):
    out = _run(EXAMPLES / "quickstart.py", ["--random", "--stage1-steps", "5", "--epochs", "1", "--shots", "4"],
               monkeypatch, tmp_path, capsys)
    assert re.search(r"base .*% \| novel .*% \| HM .*RANDOM WEIGHTS", out), out[-2000:]
    assert "zero-shot" not in out


def test_released_anchors_example_skips_cleanly_without_the_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANCHOROPT_SHARED_DATA", str(tmp_path / "nowhere"))
    out = _run(EXAMPLES / "released_anchors.py", [], monkeypatch, tmp_path, capsys)
    assert out.startswith("skipped: no released checkpoint found")


@pytest.mark.shared_data
def test_released_anchors_example_reads_the_shared_checkpoint(shared_data, monkeypatch, tmp_path, capsys):
    if not list((shared_data / "official_anchors").glob("*.pth.tar")):
        pytest.skip("no released checkpoint in the shared data")
    out = _run(EXAMPLES / "released_anchors.py", [], monkeypatch, tmp_path, capsys)
    assert re.search(r"_anchor\.pth\.tar: anchors \(1, 512\)", out), out


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_snippet_runs_on_a_tiny_tower(monkeypatch, tmp_path, capsys):
    """The snippet verbatim, with open_clip's factory giving a tiny random tower and fewer steps."""
    import open_clip

    from anchoropt.datasets.folders import make_synthetic_image_folder
    from anchoropt.runner import eval_transform, train_transform
    from anchoropt.template import default_tokenizer
    from anchoropt.testing import tiny_open_clip

    code = _readme_snippet()
    for long, short in (("steps=500", "steps=3"), ("range(10)", "range(1)")):
        assert long in code
        code = code.replace(long, short)
    model = tiny_open_clip(image_size=32)
    made = []

    def create_model_and_transforms(name, pretrained=None, **kwargs):
        made.append((name, pretrained))
        return model, train_transform(model), eval_transform(model)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create_model_and_transforms)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **kwargs: default_tokenizer())
    monkeypatch.chdir(tmp_path)
    shapes = ["circle", "cross", "square", "stripe", "triangle"]
    make_synthetic_image_folder("my_images/train", shapes[:4] + ["zigzag"], per_class=4)
    make_synthetic_image_folder("my_images/test", shapes[:4] + ["zigzag"], per_class=3, seed=1)
    names = ["circle", "cross", "square", "stripe", "zigzag"]
    Path("descriptions.json").write_text(json.dumps({n: [f"a {n}.", f"a drawing of a {n}."] for n in names}))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert made == [("ViT-B-16", "openai")]
    assert namespace["base"] == ["circle", "cross", "square"] and namespace["novel"] == ["stripe", "zigzag"]
    # novel logits are computed on the novel test images (6 of them), over the 2 novel classes
    assert tuple(namespace["novel_logits"].shape) == (6, 2)
    assert (tmp_path / "runs" / "anchoropt" / "anchoropt.safetensors").is_file()
    assert re.search(r"novel accuracy: [0-9.]+", capsys.readouterr().out)
