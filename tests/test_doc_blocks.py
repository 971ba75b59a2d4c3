"""Every ```python and ```bash block of README.md and docs/**/*.md runs as written.

Each block is one test (id: ``page:line``).  A Python block is executed with ``exec`` in a fresh temporary
folder; a bash block is run by ``bash -e -o pipefail`` in a fresh temporary folder where ``anchoropt`` and
``python`` are this interpreter with this checkout on ``PYTHONPATH`` (``examples/`` and ``benchmarks/`` are
copied in, so their relative paths work and nothing is written into the checkout).  Blocks included from
files (``--8<--``) are the example scripts, run by ``tests/test_examples.py``; ``text``, ``diff``, ``json`` and
unlabelled blocks are not code.

A block may carry one HTML comment on the line right before its opening fence (invisible on the site and on
GitHub)::

    <!-- doc-test: setup=tiny_model -->
    <!-- doc-test: args[train]="--epochs 1 --stage1-steps 2" args[toyworld-make]="--classes 4 --per-class 8" -->
    <!-- doc-test: needs=real-weights -->

``setup=NAME``
    Python: the block runs in the namespace that ``SETUPS[NAME]`` builds (tiny random towers of
    ``anchoropt.testing`` standing in for the ``model``, ``classnames``, ``image_features`` ... a page's prose
    defines); bash: ``SETUPS[NAME]`` writes the files the block reads (synthetic ImageFolder data, a
    descriptions JSON) into the folder first.
``args[COMMAND]="..."``
    bash: these options are appended to every ``COMMAND`` line the block runs (argparse: the last value of an
    option wins), so the documented command runs at test size (fewer classes, epochs, steps, seeds).
    ``COMMAND`` is the subcommand (``train``, ``grid``, ``demo``, ``toyworld-make`` ...) or a script's name
    (``study_pae_toyworld.py``).  Everything else in the line runs as written.
``needs=REASON``
    The block needs what a test machine does not have: ``real-weights`` (ViT-B-16 openai ...),
    ``real-data`` (ImageNet, the paper's datasets), ``network`` (pip install), ``gpu``, ``peers`` (the
    CoOp / MaPLe / DePT repositories and Dassl), ``long`` (the toy CLIP's pretraining and calibration: many
    minutes).  It is not run: a Python block is compiled, and every ``anchoropt ...`` line of a bash block
    is parsed by the real argument parser in ``tests/test_docs.py::test_every_documented_command_parses``.

Substitutions (``setup=``, ``args[...]=``) keep the blocks' own lines and change only sizes and the stand-in
model; the executed blocks take about 3 minutes of one CPU thread on a quiet machine (the grid blocks most;
they run each documented method once, on one of the datasets).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS = {"real-weights", "real-data", "network", "gpu", "peers", "long"}
FENCE = re.compile(r"^```(python|bash)[^\n]*\n(.*?)^```", flags=re.S | re.M)
MARKER = re.compile(r"<!--\s*doc-test:(.*?)-->\s*$")


class Block:
    def __init__(self, page: Path, line: int, lang: str, code: str, marker: str):
        self.page, self.line, self.lang, self.code = page, line, lang, code
        self.setup = self.needs = None
        self.args: dict[str, str] = {}
        for token in shlex.split(marker):
            key, _, value = token.partition("=")
            if key == "setup":
                self.setup = value
            elif key == "needs":
                self.needs = value
            elif m := re.fullmatch(r"args\[([\w.-]+)\]", key):
                self.args[m.group(1)] = value
            else:
                raise ValueError(f"{self.id}: unknown doc-test marker {token!r}")

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT).as_posix() if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if "--8<--" in m.group(2):
                continue
            before = text[:m.start()].rstrip("\n").splitlines()
            marker = MARKER.search(before[-1]) if before else None
            found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2),
                               marker.group(1) if marker else ""))
    return found


BLOCKS = blocks()


# ---------------------------------------------------------------------------------------------------- setups

def _tiny(cwd: Path, layers: int = 2) -> dict:
    """A frozen tiny open_clip CLIP and the names the pages' prose gives its objects."""
    import torch.nn.functional as F

    from anchoropt import StageIILoss, default_tokenizer, save_anchors, testing

    torch.manual_seed(0)
    model = testing.tiny_open_clip(layers=layers).eval().requires_grad_(False)
    classnames = ["cat", "dog", "red car", "blue bird"]
    anchors = torch.randn(1, 64) * 0.02
    save_anchors(anchors, cwd / "anchors.safetensors", classnames=classnames[:2])
    return dict(torch=torch, model=model, clip_model=model, tokenizer=default_tokenizer(),
                classnames=classnames, base_classes=classnames[:2], novel_classes=classnames[2:], anchors=anchors,
                image_features=F.normalize(torch.randn(6, 32), dim=-1), labels=torch.tensor([0, 1, 0, 1, 0, 1]),
                loss_fn=StageIILoss(ce_weight=1.0, kd_weight=10.0))


def _tiny_deep(cwd: Path) -> dict:
    """``_tiny`` with 9 text blocks (deep depth 8)."""
    return _tiny(cwd, layers=9)


def _tiny_learner(cwd: Path) -> dict:
    """``_tiny`` plus a trained-shape ``learner`` (AnchorOPT, 4 soft tokens)."""
    from anchoropt import AnchorOPTPromptLearner

    from anchoropt import viz

    ns = _tiny(cwd)
    ns["viz"] = viz   # the page imports it in the block before
    ns["learner"] = AnchorOPTPromptLearner(ns["model"], ns["classnames"], ns["anchors"], n_soft=4,
                                           tokenizer=ns["tokenizer"]).eval()
    return ns


def _deep_hooks(cwd: Path) -> dict:
    """A 9-block tiny tower's pieces for running the text encoder by hand: ``matrix`` (a position-matrix
    sample), ``deep`` (per-layer prompts), ``prompts`` / ``tokenized_prompts`` and ``text_encoder``."""
    from anchoropt import AnchorOPTPromptLearner, DeepPrompts

    ns = _tiny_deep(cwd)
    learner = AnchorOPTPromptLearner(ns["model"], ns["classnames"], ns["anchors"], n_soft=4,
                                     tokenizer=ns["tokenizer"])
    matrix = learner.position.matrix()
    normal = learner.template.normal
    ns.update(matrix=matrix, deep=DeepPrompts(8, 4, learner.tower.width),
              prompts=learner.template.normal_prompts(learner.slot_tokens(matrix)),
              tokenized_prompts=normal.pool_index,
              text_encoder=lambda prompts, pool_index: learner.tower.encode(prompts, pool_index))
    return ns


def _mpa(cwd: Path) -> dict:
    """A tiny CLIP with a 12-block vision tower (MPA's depth 11) and a loader of 32 x 32 images."""
    from anchoropt import testing

    ns = _tiny(cwd)
    model = testing.tiny_open_clip(vision_layers=12).eval().requires_grad_(False)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    ns.update(model=model, train_loader=torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=8))
    return ns


def _image_folder(root: Path, per_class: int = 6) -> list[str]:
    """A synthetic ImageFolder of 4 classes (``root/<class>/<n>.png``); returns the class folder names."""
    from anchoropt.datasets import folders

    folders.make_synthetic_image_folder(root, per_class=per_class, size=32)
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _flowers(cwd: Path) -> dict:
    """``flowers/`` (a synthetic ImageFolder dataset), ``flowers.json`` (its descriptions) and ``transform``."""
    import torchvision.transforms as T

    names = _image_folder(cwd / "flowers")
    (cwd / "flowers.json").write_text(json.dumps({n: [f"a photo of a {n}.", f"a {n} in a field."] for n in names}))
    return dict(transform=T.ToTensor())


def _open_clip_offline(cwd: Path) -> dict:
    """open_clip's ``create_model_and_transforms`` / ``get_tokenizer`` answer with the tiny tower (no download);
    ``my_images/{train,test}/<class>/`` and ``descriptions.json`` exist; ``base_classes``, ``novel_classes``,
    ``loader`` (base images) and ``novel_images`` as the quickstart's prose defines them."""
    import open_clip
    import torchvision.transforms as T

    from anchoropt import default_tokenizer, testing

    def create(name, pretrained=None, **kwargs):
        transform = T.Compose([T.Resize((32, 32)), T.ToTensor()])
        return testing.tiny_open_clip(), transform, transform

    patch = pytest.MonkeyPatch()
    patch.setattr(open_clip, "create_model_and_transforms", create)
    patch.setattr(open_clip, "get_tokenizer", lambda name: default_tokenizer())
    names = _image_folder(cwd / "synthetic", per_class=6)
    for split in ("train", "test"):
        (cwd / "my_images" / split).mkdir(parents=True)
        for name in names:
            (cwd / "my_images" / split / name).symlink_to(cwd / "synthetic" / name)
    classnames = [n.replace("_", " ") for n in sorted(names)]
    (cwd / "descriptions.json").write_text(json.dumps({n: [f"a photo of a {n}.", f"a {n}, drawn."]
                                                       for n in classnames}))
    n_base = math.ceil(len(classnames) / 2)
    images = torch.rand(8, 3, 32, 32)
    ns = dict(base_classes=classnames[:n_base], novel_classes=classnames[n_base:],
              loader=[(images, torch.arange(8) % n_base)], novel_images=torch.rand(4, 3, 32, 32))
    ns["_undo"] = patch.undo
    return ns


def _layer_prompts(cwd: Path) -> dict:
    """``p1`` .. ``p4``: four layers' prompts ``(T, 768)``."""
    return {f"p{i}": torch.randn(4, 768) for i in range(1, 5)}


SETUPS = {"layer_prompts": _layer_prompts, "tiny_model": _tiny, "tiny_deep": _tiny_deep, "tiny_learner": _tiny_learner,
          "deep_hooks": _deep_hooks, "mpa": _mpa, "flowers": _flowers, "open_clip_offline": _open_clip_offline}


# ---------------------------------------------------------------------------------------------------- runners

SHIM = r'''
import json, os, runpy, sys
kind, argv = sys.argv[1], sys.argv[2:]
extra = json.loads(os.environ.get("DOC_TEST_ARGS", "{}"))
if kind == "anchoropt":
    argv = ["-m", "anchoropt", *argv]
words = argv[2:] if argv[:1] == ["-m"] else argv
module = argv[1] if argv[:1] == ["-m"] else None
if module == "anchoropt.toyworld":
    key = "toyworld-" + words[0] if words else "toyworld"
elif module == "anchoropt":
    key = words[0] if words else ""
    if key == "toyworld" and len(words) > 1:
        key = "toyworld-" + words[1]
else:
    key = os.path.basename(words[0]) if words else ""
argv = argv + extra.get(key, "").split()
os.execv(sys.executable, [sys.executable, *argv])
'''


def _run_bash(block: Block, cwd: Path) -> None:
    bin_dir = cwd / ".doc-test-bin"
    bin_dir.mkdir()
    (bin_dir / "shim.py").write_text(SHIM)
    for name in ("anchoropt", "python", "python3"):
        kind = "anchoropt" if name == "anchoropt" else "python"
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bin_dir / "shim.py"}" {kind} "$@"\n')
        tool.chmod(0o755)
    for folder in ("examples", "benchmarks"):  # copies: a script's default output beside itself stays in cwd
        shutil.copytree(ROOT / folder, cwd / folder, ignore=shutil.ignore_patterns("results", "__pycache__"))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "DOC_TEST_ARGS": json.dumps(block.args), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.id} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block: Block, tmp_path, monkeypatch):
    if block.needs is not None:
        assert block.needs in NEEDS, f"{block.id}: needs={block.needs!r} is not one of {sorted(NEEDS)}"
        if block.lang == "python":
            compile(block.code, block.id, "exec")  # a syntax error still fails
        return
    assert block.setup is None or block.setup in SETUPS, f"{block.id}: no setup {block.setup!r}"
    assert block.lang == "bash" or not block.args, f"{block.id}: args[...] is for bash blocks"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = SETUPS[block.setup](tmp_path) if block.setup else {}
    try:
        if block.lang == "python":
            with warnings.catch_warnings():  # a page shows the current import paths, not the moved ones
                warnings.filterwarnings("error", message=r"anchoropt\S* moved to", category=DeprecationWarning)
                exec(compile(block.code, block.id, "exec"), {"__name__": "__doc_block__", **namespace})
        else:
            _run_bash(block, tmp_path)
    finally:
        namespace.get("_undo", lambda: None)()


def test_blocks_are_found_and_most_run():
    """The collector sees the pages' blocks (a changed fence style would silently drop them)."""
    assert len(BLOCKS) >= 40
    assert sum(b.needs is None for b in BLOCKS) >= 20
    for page in PAGES:  # code the collector would miss: other fence names, fences indented in a list
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"^\s*```(sh|shell|console|py|python3|pycon)\b", text, flags=re.M), page.name
        for m in re.finditer(r"^ +```(python|bash)[^\n]*\n(.*?)^ *```", text, flags=re.S | re.M):
            assert "--8<--" in m.group(2), f"{page.name}: an indented {m.group(1)} block is not run"


def test_a_broken_block_fails(tmp_path, monkeypatch):
    """The harness itself: a block that raises, or a command that fails, fails its test."""
    page = tmp_path / "page.md"
    py = Block(page, 2, "python", "raise RuntimeError('boom')\n", "")
    sh = Block(page, 6, "bash", "anchoropt presets --no-such-option\n", "")
    with pytest.raises(RuntimeError, match="boom"):
        test_doc_block_runs(py, tmp_path, monkeypatch)
    (tmp_path / "b").mkdir()
    with pytest.raises(AssertionError, match="failed"):
        _run_bash(sh, tmp_path / "b")
    with pytest.raises(ValueError, match="unknown doc-test marker"):
        Block(page, 2, "python", "", "setpu=tiny_model")
