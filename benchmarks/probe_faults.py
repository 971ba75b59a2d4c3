"""Fault probe (issue 11): try the kinds of bad input and interruption a new user meets, tally how each ends.

Each kind ends as one of

* ``clear``    - refused with a message naming the problem (for ``train``: before the model is built);
* ``correct``  - a valid (if unusual) input accepted with the right result, or a fault survived intact;
* ``other``    - accepted with a wrong result, an error that does not name the problem, or a late error.

Run it against any checkout (the package is imported from ``--repo``; the probe uses only public APIs and the
CLI, so it also runs on older code)::

    python benchmarks/probe_faults.py                       # this checkout
    python benchmarks/probe_faults.py --repo OLD_CHECKOUT   # e.g. a `git archive` of an older commit
    python benchmarks/probe_faults.py --kills 20            # interruptions of a re-save (subprocess kills)

Prints one line per kind and the tallies; writes ``benchmarks/results/probe_faults.json``.
Not part of the test suite (the kill loops take about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

NAN, INF = float("nan"), float("inf")


class Late(Exception):
    """Raised by the patched model builder: the bad input was not found before the model was built."""


class Outcome(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _names(text: str, keywords) -> bool:
    """Every keyword in ``text`` (case-insensitive; ``_`` and ``-`` alike, so --batch-size matches batch_size)."""
    text = text.lower().replace("_", "-")
    return all(k.lower().replace("_", "-") in text for k in keywords)


def expect_error(call, *keywords: str):
    """``call()`` must raise with every keyword in its message (case-insensitive)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Late:
        raise Outcome("other", "late: the model was built before the error") from None
    except Outcome:
        raise
    except BaseException as err:  # noqa: BLE001 - any exception is a result to classify
        text = f"{type(err).__name__}: {err}"
        if _names(text, keywords):
            raise Outcome("clear", text[:160]) from None
        raise Outcome("other", "unclear error: " + text[:160]) from None
    raise Outcome("other", "accepted silently")


def expect_warning(call, *keywords: str):
    """``call()`` must succeed with a warning holding every keyword (a quiet acceptance is wrong)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except BaseException as err:  # noqa: BLE001
            raise Outcome("other", f"error instead of a warning: {type(err).__name__}: {str(err)[:120]}") from None
    texts = [str(w.message) for w in caught]
    if any(_names(t, keywords) for t in texts):
        raise Outcome("correct", "warned: " + next(t for t in texts if keywords[0].lower() in t.lower())[:140])
    raise Outcome("other", "accepted without a word")


def cli(args: list[str], *keywords: str, no_model: bool = True):
    """``anchoropt ARGS`` in-process must exit 2 with the keywords on stderr, no traceback, before the model."""
    from anchoropt.runner import cli as entry
    from anchoropt.runner import run as run_module

    err = io.StringIO()
    saved = run_module.build_model
    if no_model:
        run_module.build_model = lambda *a, **k: (_ for _ in ()).throw(Late())
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = entry.main(args)
    except Late:
        raise Outcome("other", "late: the model was built before the bad input was found") from None
    except SystemExit as exit_:
        code = exit_.code
    except BaseException as exc:  # noqa: BLE001
        raise Outcome("other", f"traceback: {type(exc).__name__}: {str(exc)[:140]}") from None
    finally:
        run_module.build_model = saved
    text = err.getvalue()
    if code == 0:
        raise Outcome("other", "accepted silently")
    if "Traceback" not in text and _names(text, keywords):
        raise Outcome("clear", text.strip().splitlines()[-1][:160])
    raise Outcome("other", f"exit {code}, unclear: {text.strip()[-160:]}")


# ---------------------------------------------------------------------- the world the cases run in
class World:
    def __init__(self, root: Path):
        import torch

        from anchoropt.datasets import folders as D

        self.root = root
        self.folder = D.make_synthetic_image_folder(root / "shapes", per_class=12, size=32)
        self.names = D.read_image_folder(self.folder)[1]
        self.desc = root / "desc.json"
        self.desc.write_text(json.dumps({n: [f"a picture of a {n}.", f"a {n} in one colour."] for n in self.names}))
        from anchoropt.testing import tiny_open_clip

        self.model = tiny_open_clip().requires_grad_(False).eval()
        self.torch = torch
        self.fast = ["--model", "tiny-test", "--pretrained", "none", "--shots", "2", "--epochs", "1",
                     "--warmup-epochs", "0", "--batch-size", "8", "--stage1-steps", "2", "--no-progress",
                     "--no-plots"]
        self.n = 0

    def tmp(self) -> Path:
        self.n += 1
        path = self.root / f"case{self.n}"
        path.mkdir()
        return path

    def learner(self, seed: int = 0, classes=("cat", "dog", "golden retriever")):
        from anchoropt import AnchorOPTPromptLearner

        torch = self.torch
        torch.manual_seed(seed)
        learner = AnchorOPTPromptLearner(self.model, list(classes), torch.randn(1, 64) * 0.02, n_soft=4)
        with torch.no_grad():
            learner.soft.add_(torch.randn_like(learner.soft))
            learner.position.logits.add_(torch.randn_like(learner.position.logits) * 3)
        return learner.eval()

    def train_args(self, out: Path, *extra: str) -> list[str]:
        return ["train", "--data", str(self.folder), "--descriptions", str(self.desc), "-o", str(out),
                *self.fast, *extra]

    def trained_run(self, seed: int = 1) -> Path:
        from anchoropt.runner import cli as entry

        out = self.tmp() / "run"
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert entry.main(self.train_args(out, "--seed", str(seed))) == 0
        return out


# ---------------------------------------------------------------------- cases
CASES: list[tuple[str, str, object]] = []  # (area, kind, function(world))


def case(area: str, kind: str):
    def register(function):
        CASES.append((area, kind, function))
        return function

    return register


def _save_dir(w: World, learner=None) -> Path:
    out = w.tmp() / "learner"
    (learner or w.learner()).save_pretrained(out)
    return out


def _rewrite_weights(directory: Path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "anchoropt.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "anchoropt.safetensors"))


def _rewrite_config(directory: Path, edit):
    path = directory / "anchoropt_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _load(w: World, directory: Path):
    from anchoropt import load_prompt_learner

    return load_prompt_learner(directory, w.model, ["cat", "dog"])


@case("save", "tensor tampered with NaN")
def _(w):
    d = _save_dir(w)
    _rewrite_weights(d, lambda t: t["soft"].__setitem__((0, 0), NAN))
    expect_error(lambda: _load(w, d), "soft")


@case("save", "weights of another save mixed in")
def _(w):
    a, b = _save_dir(w, w.learner(1)), _save_dir(w, w.learner(2))
    shutil.copy(b / "anchoropt.safetensors", a / "anchoropt.safetensors")
    expect_error(lambda: _load(w, a), "match")


def _config_case(edit, *keys):
    def run(w):
        d = _save_dir(w)
        _rewrite_config(d, edit)
        expect_error(lambda: _load(w, d), *keys)

    return run


for _kind, _edit, _keys in [
    ("config missing a key", lambda c: c.pop("tau"), ("tau", "anchoropt_config.json")),
    ("non-integer format_version", lambda c: c.update(format_version="two"), ("format_version",)),
    ("newer format_version", lambda c: c.update(format_version=99), ("newer",)),
    ("wrong type in a config (n_soft '4')", lambda c: c.update(n_soft="4"), ("n_soft",)),
]:
    case("save", _kind)(_config_case(_edit, *_keys))


@case("save", "weights file not safetensors")
def _(w):
    d = _save_dir(w)
    (d / "anchoropt.safetensors").write_bytes(b"garbage")
    expect_error(lambda: _load(w, d), "anchoropt.safetensors")


@case("save", "anchors file holding NaN")
def _(w):
    from safetensors.torch import save_file

    from anchoropt import load_anchors

    path = w.tmp() / "a.safetensors"
    save_file({"anchors": w.torch.full((1, 64), NAN)}, str(path))
    expect_error(lambda: load_anchors(path), "nan")


@case("save", "full disk during a re-save (RLIMIT_FSIZE)")
def _(w):
    out = w.tmp() / "learner"
    script = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(REPO)!r})
from anchoropt import AnchorOPTPromptLearner
from anchoropt.testing import tiny_open_clip
m = tiny_open_clip()
torch.manual_seed(0); a = AnchorOPTPromptLearner(m, ["cat", "dog"], torch.randn(1, 64), n_soft=4)
a.save_pretrained({str(out)!r})
torch.manual_seed(1); b = AnchorOPTPromptLearner(m, ["cat", "dog"], torch.randn(1, 64), n_soft=4)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))
try:
    b.save_pretrained({str(out)!r})
    print("SAVED")
except Exception as err:
    print("ERROR", type(err).__name__, err)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if "ERROR" not in proc.stdout:
        raise Outcome("other", f"no error on a full disk: {proc.stdout.strip()[-100:]} {proc.stderr.strip()[-100:]}")
    torch = w.torch
    torch.manual_seed(0)
    expected = torch.randn(1, 64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = _load(w, out)
    except Exception as err:  # noqa: BLE001
        raise Outcome("other", f"the previous save is lost: {type(err).__name__}: {str(err)[:100]}") from None
    if torch.equal(loaded.anchors.cpu(), expected):
        raise Outcome("correct", "error reported, previous save intact")
    raise Outcome("other", "previous save replaced by a partial one")


def _in_place(learner, torch):
    with torch.no_grad():
        learner.soft.mul_(-1)


def _cache_case(change):
    def run(w):
        torch = w.torch
        learner = w.learner(3)
        images = torch.randn(4, 32)
        before = learner.predict(images, "novel")
        change(learner, torch)
        from anchoropt import AnchorOPTPromptLearner

        fresh = AnchorOPTPromptLearner(w.model, learner.classnames, learner.anchors.clone(), n_soft=4).eval()
        fresh.load_state_dict(learner.state_dict())
        after = learner.predict(images, "novel")
        if torch.equal(after, fresh.predict(images, "novel")) and not torch.equal(after, before):
            raise Outcome("correct", "predictions follow the change")
        raise Outcome("other", "stale predictions after the change")

    return run


for _name, _change in [
    (".data.copy_ on soft tokens", lambda l, t: l.soft.data.copy_(t.randn_like(l.soft))),
    (".data = on position logits", lambda l, t: setattr(l.position.logits, "data", l.position.logits.data.flip(0).clone())),
    ("load_state_dict", lambda l, t: l.load_state_dict({**l.state_dict(), "soft": t.randn_like(l.soft)})),
    ("in-place op under no_grad", lambda l, t: _in_place(l, t)),
    (".data.copy_ on anchors", lambda l, t: l.anchors.data.copy_(t.randn_like(l.anchors))),
]:
    case("cache", _name)(_cache_case(_change))


def _desc_file(w, content: bytes) -> Path:
    path = w.tmp() / "descriptions.json"
    path.write_bytes(content)
    return path


def _load_desc(path, classes=None):
    from anchoropt.descriptions import load_descriptions

    return load_descriptions(path, classes)


for _kind, _content, _keys in [
    ("duplicate key in a descriptions JSON", b'{"cat": ["a cat."], "cat": ["another cat."]}', ("cat", "twice")),
    ("non-UTF-8 descriptions file", '{"caf\u00e9": ["a caf\u00e9."]}'.encode("latin-1"), ("descriptions.json", "utf-8")),
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, ("descriptions.json", "nest")),
    ("NaN constant in JSON", b'{"cat": NaN}', ("descriptions.json", "nan")),
    ("JSON list instead of an object", b'[["cat", "a cat."]]', ("descriptions.json", "object")),
    ("class with an empty list", b'{"cat": []}', ("cat", "empty")),
    ("invalid JSON", b'{"cat": ["a cat."', ("descriptions.json", "not valid json")),
]:
    case("json", _kind)(lambda w, c=_content, k=_keys: expect_error(lambda: _load_desc(_desc_file(w, c)), *k))


@case("json", "class missing from the descriptions")
def _(w):
    path = _desc_file(w, b'{"cat": ["a cat."]}')
    expect_error(lambda: _load_desc(path, ["cat", "dog"]), "dog")


@case("json", "description longer than 77 tokens")
def _(w):
    from anchoropt import AnchorLearner

    learner = AnchorLearner(w.model, ["cat"])
    expect_warning(lambda: learner.targets({"cat": ["a cat " * 125 + "."]}), "cut")


def _folder(w, names, per_class=2) -> Path:
    from anchoropt.datasets import folders as D

    src = D.make_synthetic_image_folder(w.tmp() / "src", ("x",), per_class=1, size=8)
    image = (src / "x" / "0000.png").read_bytes()
    root = w.tmp() / "data"
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class if name != "empty" else 0):
            (root / name / f"{i}.png").write_bytes(image)
    return root


def _read(root):
    from anchoropt.datasets import folders as D

    return D.read_image_folder(root)


case("data", "empty class folder")(lambda w: expect_error(lambda: _read(_folder(w, ["cat", "dog", "empty"])), "empty"))
case("data", "folders sea_lion and 'sea lion'")(
    lambda w: expect_error(lambda: _read(_folder(w, ["sea_lion", "sea lion"])), "same class"))
case("data", "folders Cat and cat")(lambda w: expect_error(lambda: _read(_folder(w, ["Cat", "cat"])), "same class"))


@case("data", "class names Cat and cat in a learner")
def _(w):
    expect_error(lambda: w.learner(classes=("Cat", "cat")), "cat", "same")


@case("data", "more shots than a class has")
def _(w):
    from anchoropt.datasets import folders as D

    records = [D.Record(f"{c}{i}", label, c) for label, (c, n) in enumerate((("cat", 8), ("dog", 2))) for i in range(n)]
    expect_warning(lambda: D.few_shot(records, 4, 0), "dog")


@case("data", "split file with a string label")
def _(w):
    from anchoropt.datasets import folders as D

    path = w.tmp() / "split.json"
    path.write_text(json.dumps({"train": [["a.png", "zero", "cat"]], "val": [], "test": [["b.png", 0, "cat"]]}))
    expect_error(lambda: D.read_split_json(path, w.root), "split.json", "label")


@case("data", "non-UTF-8 classnames.txt")
def _(w):
    from anchoropt.datasets import folders as D

    path = w.tmp() / "classnames.txt"
    path.write_bytes("n01 caf\u00e9\n".encode("latin-1"))
    expect_error(lambda: D.read_classnames_file(path), "classnames.txt", "utf-8")


@case("data", "image folder without class folders")
def _(w):
    root = w.tmp() / "flat"
    root.mkdir()
    expect_error(lambda: _read(root), "sub-directories")


for _flag, _value, _keys in [
    ("--tau", "nan", ("tau",)), ("--tau", "0", ("tau",)), ("--kd-weight", "nan", ("kd-weight",)),
    ("--kd-temperature", "nan", ("kd-temperature",)), ("--lr", "nan", ("lr",)), ("--lr", "-1", ("lr",)),
    ("--stage1-mse-weight", "-1", ("mse-weight",)), ("--kd-normalization", "per-class", ("kd-normalization",)),
    ("--workers", "-2", ("workers",)), ("--epochs", "0", ("epochs",)), ("--batch-size", "0", ("batch-size",)),
    ("--n-soft", "-1", ("n-soft",)), ("--momentum", "inf", ("momentum",)), ("--device", "gpu9", ("device",)),
    ("--p-train", "1.5", ("p-train",)), ("--max-descriptions", "0", ("max-descriptions",)),
    ("--ce-weight", "-1", ("ce-weight",)), ("--shots", "-3", ("shots",)), ("--shots", "0", ("shots",)),
    ("--warmup-lr", "nan", ("warmup-lr",)),
]:
    case("option", f"train {_flag} {_value}")(
        lambda w, f=_flag, v=_value, k=_keys: cli(w.train_args(w.tmp() / "run", f, v), *k))


@case("option", "train --output under a file")
def _(w):
    blocker = w.tmp() / "file"
    blocker.write_text("x")
    cli(w.train_args(blocker / "run"), "not a directory")


@case("option", "train with an unreadable image")
def _(w):
    bad = w.tmp() / "bad"
    shutil.copytree(w.folder, bad)
    for path in (bad / w.names[0]).glob("*.png"):  # a whole class: some are sampled for training and test
        path.write_bytes(b"not an image")
    cli([*w.train_args(w.tmp() / "run"), "--data", str(bad)], "image", "cannot be read")


@case("option", "train with descriptions missing a class")
def _(w):
    partial = w.tmp() / "partial.json"
    partial.write_text(json.dumps({n: [f"a {n}."] for n in w.names[1:]}))
    cli([*w.train_args(w.tmp() / "run"), "--descriptions", str(partial)], "no descriptions")


@case("option", "train with a NaN anchors file")
def _(w):
    from safetensors.torch import save_file

    path = w.tmp() / "a.safetensors"
    save_file({"anchors": w.torch.full((1, 64), NAN)}, str(path))
    args = [a for a in w.train_args(w.tmp() / "run") if a not in ("--descriptions", str(w.desc))]
    cli([*args, "--anchors", str(path)], "nan")


def _lib(kind, call, *keys):
    case("number", kind)(lambda w: expect_error(lambda: call(w), *keys))


_lib("PositionMatrix tau NaN", lambda w: __import__("anchoropt").PositionMatrix(4, 1, tau=NAN), "tau")
_lib("StageIILossConfig kd_weight NaN", lambda w: __import__("anchoropt.losses").losses.StageIILossConfig(kd_weight=NAN),
     "kd_weight")
_lib("distillation temperature NaN", lambda w: __import__("anchoropt.losses").losses.StageIILossConfig(temperature=NAN),
     "temperature")
_lib("Stage I negative mse_weight",
     lambda w: __import__("anchoropt").AnchorLearner(w.model, ["cat"]).fit({"cat": ["a cat."]}, steps=1,
                                                                           mse_weight=-1.0, progress=False),
     "mse_weight")


def _predict(w, features):
    return w.learner().predict(features)


_lib("NaN image features in predict", lambda w: _predict(w, w.torch.full((2, 32), NAN)), "image_features", "nan")
_lib("inf image features in predict", lambda w: _predict(w, w.torch.full((2, 32), INF)), "image_features", "inf")
_lib("image features of the wrong width", lambda w: _predict(w, w.torch.randn(2, 64)), "image_features", "shape")


def _loss(w, normal, anchor, target):
    from anchoropt.functional import anchoropt_loss

    return anchoropt_loss(normal, anchor, target)


_lib("empty batch in the loss",
     lambda w: _loss(w, w.torch.zeros(0, 3), w.torch.zeros(0, 3), w.torch.zeros(0, dtype=w.torch.long)), "batch")
_lib("NaN logits in the loss",
     lambda w: _loss(w, w.torch.full((2, 3), NAN), w.torch.zeros(2, 3), w.torch.tensor([0, 1])), "logits", "nan")


@case("number", "fp16 tower overflowing (anchors of large norm)")
def _(w):
    from anchoropt import AnchorOPTPromptLearner
    from anchoropt.testing import tiny_openai_clip

    model = tiny_openai_clip(fp16=True).requires_grad_(False).eval()
    learner = AnchorOPTPromptLearner(model, ["cat", "dog"], w.torch.randn(1, 64) * 1e5).eval()
    expect_error(lambda: learner.predict(w.torch.randn(2, 32)), "float16")


@case("rundir", "re-run into a finished run directory")
def _(w):
    out = w.trained_run()
    before = (out / "results.json").read_bytes()
    try:
        cli(w.train_args(out, "--seed", "2"), "finished", no_model=False)
    except Outcome as outcome:
        if outcome.kind == "clear" and (out / "results.json").read_bytes() == before:
            raise
        raise Outcome("other", "the finished run was overwritten") from None


@case("rundir", "resume an interrupted run")
def _(w):
    out = w.trained_run()
    (out / "results.json").unlink()  # as a run killed during its evaluation leaves it
    from anchoropt.runner import cli as entry

    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = entry.main(w.train_args(out, "--resume"))
        except SystemExit as exit_:
            code = exit_.code
    if code == 0 and (out / "results.json").is_file():
        raise Outcome("correct", "resumed and finished")
    raise Outcome("other", f"exit {code}: {err.getvalue().strip()[-120:]}")


@case("rundir", "second run into a directory in use")
def _(w):
    out = w.tmp() / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".anchoropt.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                          "started": "now", "what": "anchoropt train"}))
        cli(w.train_args(out), "in use")
    finally:
        holder.kill()
        holder.wait()


@case("rundir", "eval of a directory mixing two runs")
def _(w):
    a, b = w.trained_run(1), w.trained_run(2)
    shutil.rmtree(a / "prompt_learner")
    shutil.copytree(b / "prompt_learner", a / "prompt_learner")
    cli(["eval", str(a), "--no-progress"], "mixes", no_model=False)


@case("rundir", "eval with a wrong type in run_config.json")
def _(w):
    out = w.trained_run()
    values = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**values, "epochs": "1"}))
    cli(["eval", str(out), "--no-progress"], "epochs", "run_config.json")


@case("rundir", "eval of a directory without run_config.json")
def _(w):
    cli(["eval", str(w.tmp()), "--no-progress"], "run_config.json")


# ---------------------------------------------------------------------- bad inputs of issue 21 (part B)
def _spec(spec):
    from anchoropt.methods.registry import parse_method

    return parse_method(spec)


case("spec", "method option given twice (n_soft=4,n_soft=8)")(
    lambda w: expect_error(lambda: _spec("coop:n_soft=4,n_soft=8"), "n_soft", "twice"))
case("spec", "method option of the wrong type (n_soft=abc)")(
    lambda w: expect_error(lambda: _spec("coop:n_soft=abc"), "n_soft", "abc"))

for _kind, _extra, _keys in [
    ("train --precision no-such-precision", ["--precision", "no-such-precision"], ("precision", "fp32")),
    ("train maple:deep_depth=-1", ["--method", "maple:deep_depth=-1"], ("deep_depth",)),
    ("train coop+anchoropt:tau=0 (spec value)", ["--method", "coop+anchoropt:tau=0"], ("tau",)),
    ("train coop+anchoropt:kd_weight=-1 (spec value)", ["--method", "coop+anchoropt:kd_weight=-1"], ("kd_weight",)),
    ("train coop:n_soft=-1 (spec value)", ["--method", "coop:n_soft=-1"], ("n_soft",)),
    ("train zeroshot:templates=a {} of {x}", ["--method", "zeroshot:templates=a {} of {x}"], ("templates",)),
    ("train coop:csc=true under base2novel", ["--method", "coop:csc=true"], ("csc", "novel")),
    ("train --pae --method maple", ["--method", "maple", "--pae", "--deep-depth", "2"], ("pae", "maple")),
]:
    case("spec", _kind)(lambda w, e=_extra, k=_keys: cli(w.train_args(w.tmp() / "run", *e), *k))


def _image_pixels(path):
    """The RGB pixels the runner's data path reads from ``path`` (``ImageDataset`` without a transform)."""
    import numpy as np

    from anchoropt.datasets import folders as D

    return np.asarray(D.ImageDataset([D.Record(str(path), 0, "x")])[0][0])


def _bomb_png(path: Path, side: int = 20000) -> Path:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@case("image", "16-bit greyscale PNG")
def _(w):
    import numpy as np
    from PIL import Image

    path = w.tmp() / "g16.png"
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(path)
    levels = len(np.unique(_image_pixels(path)))
    raise Outcome("correct" if levels > 200 else "other", f"{levels} grey levels of 256")


@case("image", "palette PNG with transparency vs the RGBA original")
def _(w):
    from PIL import Image

    d = w.tmp()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(d / "rgba.png")
    palette = rgba.convert("P")
    palette.save(d / "p.png", transparency=palette.getpixel((1, 1)))
    a, b = _image_pixels(d / "rgba.png"), _image_pixels(d / "p.png")
    raise Outcome("correct" if (a == b).all() else "other", f"RGBA {a[0, 1].tolist()} / palette {b[0, 1].tolist()}")


@case("image", "LA PNG (alpha) vs RGBA of the same picture")
def _(w):
    from PIL import Image

    d = w.tmp()
    Image.new("LA", (4, 4), (100, 0)).save(d / "la.png")
    Image.new("RGBA", (4, 4), (100, 100, 100, 0)).save(d / "rgba.png")  # alpha dropped or composited: alike
    a, b = _image_pixels(d / "la.png"), _image_pixels(d / "rgba.png")
    raise Outcome("correct" if (a == b).all() else "other", f"LA {a[0, 0].tolist()} / RGBA {b[0, 0].tolist()}")


@case("image", "CMYK JPEG")
def _(w):
    from PIL import Image

    path = w.tmp() / "c.jpg"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path)
    pixel = _image_pixels(path)[0, 0].tolist()
    raise Outcome("correct" if pixel == [255, 0, 0] else "other", f"pure red reads as {pixel}")


@case("image", "PNG header claiming 20000 x 20000 (decompression bomb)")
def _(w):
    path = _bomb_png(w.tmp() / "bomb.png")
    expect_error(lambda: _image_pixels(path), "bomb.png", "decompression")


@case("image", "train with a decompression bomb in the data")
def _(w):
    bad = w.tmp() / "bomb"
    shutil.copytree(w.folder, bad)
    for path in (bad / w.names[0]).glob("*.png"):
        _bomb_png(path)
    cli([*w.train_args(w.tmp() / "run"), "--data", str(bad)], "decompression", ".png")


@case("image", "train with a truncated test image")
def _(w):
    from anchoropt.datasets import folders as D

    bad = w.tmp() / "cut"
    shutil.copytree(w.folder, bad)
    victim = Path(D.open_dataset(bad).test[-1].path)  # a novel class's test image
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cli([*w.train_args(w.tmp() / "run"), "--data", str(bad)], victim.name)


@case("data", "class folder with one image (round(0.5) = 0 training images)")
def _(w):
    from anchoropt.datasets import folders as D

    root = _folder(w, ["cat", "dog", "owl"], per_class=4)
    for extra in sorted((root / "dog").glob("*.png"))[1:]:
        extra.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = D.open_dataset(root)
        except Exception as err:  # noqa: BLE001
            raise Outcome("clear" if _names(str(err), ("dog",)) else "other", str(err)[:140]) from None
    if any(r.classname == "dog" for r in dataset.train):
        raise Outcome("correct", "the class keeps a training image")
    if any(_names(str(c.message), ("dog",)) for c in caught):
        raise Outcome("correct", "warned by name")
    raise Outcome("other", "the class has no training image and nothing was said")


_lib("all-zero image-feature row in predict",
     lambda w: _predict(w, w.torch.cat([w.torch.randn(1, 32), w.torch.zeros(1, 32)])), "image_features", "zero")


@case("number", "two predict() calls in train mode")
def _(w):
    torch = w.torch
    learner = w.learner(4).train()
    features = torch.randn(8, 32)
    a, b = learner.predict(features, "novel"), learner.predict(features, "novel")
    gap = float((a - b).abs().max())
    raise Outcome("correct" if gap == 0 else "other", f"largest difference {gap:.3g}")


@case("cache", "image replaced (same size, mtime restored) under the feature cache")
def _(w):
    import numpy as np
    from PIL import Image

    from anchoropt.datasets import folders as D
    from anchoropt.runner import build_model
    from anchoropt.runner.features import FeatureStore

    root, rng = w.tmp() / "imgs", np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / "0.bmp")
    records = D.read_image_folder(root)[0]
    store = FeatureStore(build_model("tiny-test"), root.parent / "f.safetensors")
    first = store.table(records)
    store.save()
    victim = Path(records[0].path)
    stat = victim.stat()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(victim)  # BMP: the same size
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = FeatureStore(store.bundle, root.parent / "f.safetensors").table(records)
    stale = w.torch.equal(again[0], first[0])
    raise Outcome("other" if stale else "correct", "stale cached feature" if stale else "encoded again")


@case("save", "truncated image-feature cache file")
def _(w):
    from anchoropt.datasets import folders as D
    from anchoropt.runner import build_model
    from anchoropt.runner.features import FeatureStore

    path = w.tmp() / "features.safetensors"
    store = FeatureStore(build_model("tiny-test"), path)
    store.table(D.read_image_folder(w.folder)[0][:2])
    store.save()
    path.write_bytes(path.read_bytes()[:40])
    expect_error(lambda: FeatureStore(store.bundle, path), "features.safetensors")


@case("rundir", "eval of a run whose anchors.safetensors is truncated")
def _(w):
    out = w.trained_run()
    anchors = out / "anchors.safetensors"
    anchors.write_bytes(anchors.read_bytes()[:30])
    cli(["eval", str(out), "--no-progress"], "anchors.safetensors", no_model=False)


def _toy_world(w) -> Path:
    """A small toy-world dataset, made once per probe."""
    if getattr(w, "toy_world", None) is None:
        from anchoropt.toyworld.make import make

        w.toy_world = w.tmp() / "toy"
        make(w.toy_world, classes=2, per_class=5)
    return w.toy_world


def _other_architecture(w) -> Path:
    from safetensors.torch import save_file

    path = w.tmp() / "other.safetensors"
    save_file({k: v.contiguous() for k, v in w.model.state_dict().items()}, str(path))
    return path


case("toyworld", "toyworld make --seed -1")(
    lambda w: cli(["toyworld", "make", str(w.tmp() / "w"), "--seed", "-1", "--classes", "2", "--per-class", "5"],
                  "seed"))
for _template in ("{} and {}", "{} {x}"):
    case("toyworld", f"toyworld zeroshot --template '{_template}'")(
        lambda w, t=_template: cli(["toyworld", "zeroshot", str(_toy_world(w)), "--template", t], "template"))


@case("toyworld", "toyworld zeroshot --weights model.pt (a pickle)")
def _(w):
    path = w.tmp() / "model.pt"
    w.torch.save({"w": w.torch.zeros(1)}, path)
    cli(["toyworld", "zeroshot", str(_toy_world(w)), "--weights", str(path)], "model.pt", "safetensors")


@case("toyworld", "train --model toy-clip --pretrained <another architecture>")
def _(w):
    other = _other_architecture(w)
    cli([*w.train_args(w.tmp() / "run"), "--model", "toy-clip", "--pretrained", str(other)], "other.safetensors",
        "toy")


def _grid_out(w, results: dict, spec: bytes | None = None) -> Path:
    out = w.tmp() / "grid"
    run = out / "runs" / "coop" / "shapes" / "seed1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    if spec is not None:
        (out / "grid.json").write_bytes(spec)
    return out


_B2N = {"protocol": "base2novel", "dataset": "shapes", "seed": 1, "method": "coop",
        "results": {"base": {"accuracy": 50.0}, "novel": {"accuracy": 40.0}, "hm": 44.4}}
for _kind, _spec_bytes in [("corrupt grid.json", b'{"methods": ["coop"'), ("list-shaped grid.json", b'["coop"]')]:
    case("report", _kind)(lambda w, b=_spec_bytes: cli(["grid", "--report", str(_grid_out(w, _B2N, b)),
                                                        "--no-plots"], "grid.json"))
case("report", "results.json without results.base")(
    lambda w: cli(["grid", "--report", str(_grid_out(w, {**_B2N, "results": {"novel": {"accuracy": 40.0},
                                                                                "hm": 44.4}})), "--no-plots"],
                  "results.json", "base"))


# ---------------------------------------------------------------------- files and run directories (issue 21)
def _grid_args(w: World, out: Path, *data, seeds=("1",)) -> list[str]:
    """A fast zero-shot ``anchoropt grid`` over ``data`` (the world's folder by default) into ``out``."""
    return ["grid", "--methods", "zeroshot", "--data", *map(str, data or (w.folder,)), "--seeds", *seeds,
            "--output", str(out), "--model", "tiny-test", "--pretrained", "none", "--augment", "none",
            "--no-progress", "--no-plots"]


def _quiet_main(args: list[str]) -> tuple[int, str]:
    """``anchoropt ARGS`` in-process, quietly: ``(exit status, stderr)``."""
    from anchoropt.runner import cli as entry

    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = entry.main(args)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _live_lock(directory: Path, holder) -> None:
    """Write ``directory``'s run lock as held by the live process ``holder``."""
    import socket

    (directory / ".anchoropt.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                           "started": "now", "what": "anchoropt grid"}))


@case("save", "hostile manifest lists ../victim and an absolute path")
def _(w):
    d = _save_dir(w)
    victims = [d.parent / "victim.txt", w.tmp() / "abs.txt"]
    for victim in victims:
        victim.write_text("keep")
    manifest = json.loads((d / "anchoropt_manifest.json").read_text())
    manifest["files"].update({"../victim.txt": {"size": 4, "sha256": "x"}, str(victims[1]): {"size": 4, "sha256": "x"}})
    (d / "anchoropt_manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            w.learner(2).save_pretrained(d)
        except Exception as err:  # noqa: BLE001
            raise Outcome("other", f"the save failed: {type(err).__name__}: {str(err)[:120]}") from None
    lost = [str(v) for v in victims if not v.is_file()]
    if lost:
        raise Outcome("other", f"the save deleted {lost}")
    _load(w, d)
    raise Outcome("correct", "files outside the save left alone; the new save loads")


@case("rundir", "lock file created but not yet written")
def _(w):
    out = w.tmp() / "run"
    out.mkdir()
    (out / ".anchoropt.lock").write_bytes(b"")
    cli(w.train_args(out), "lock", ".anchoropt.lock")


@case("rundir", "second grid on a run folder in use")
def _(w):
    out = w.tmp() / "grid"
    run_dir = out / "runs" / w.folder.name / "zeroshot" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text(json.dumps({"run_id": "first"}))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _live_lock(run_dir, holder)
        code, err = _quiet_main(_grid_args(w, out))
    finally:
        holder.kill()
        holder.wait()
    if not (run_dir / "run_config.json").is_file():
        raise Outcome("other", "the second grid deleted the run folder the first one holds")
    if code == 2 and "in use" in err and "Traceback" not in err:
        raise Outcome("clear", err.strip().splitlines()[-1][:160])
    raise Outcome("other", f"exit {code}: {err.strip()[-160:]}")


@case("rundir", "run finished between train's check and its lock")
def _(w):
    from anchoropt.runner import rundir

    out = w.tmp() / "run"
    real = rundir.locked

    @contextlib.contextmanager
    def finished_meanwhile(directory, what="a run"):
        with real(directory, what):
            (directory / "run_config.json").write_text(json.dumps({"run_id": "A"}))
            (directory / "results.json").write_text(json.dumps({"run_id": "A", "results": {}}))
            yield

    rundir.locked = finished_meanwhile
    try:
        cli(w.train_args(out), "finished", "--overwrite")
    finally:
        rundir.locked = real


@case("rundir", "grid over a finished run with a corrupt results.json")
def _(w):
    out = w.tmp() / "grid"
    code, err = _quiet_main(_grid_args(w, out))
    results = out / "runs" / w.folder.name / "zeroshot" / "seed1" / "results.json"
    if code != 0 or not results.is_file():
        raise Outcome("other", f"the first grid failed: {err.strip()[-120:]}")
    results.write_text('{"results": {"ba')
    code, err = _quiet_main(_grid_args(w, out))
    if results.read_text() != '{"results": {"ba':
        raise Outcome("other", "the damaged run was deleted and retrained")
    if code == 2 and "results.json" in err and "Traceback" not in err:
        raise Outcome("clear", err.strip().splitlines()[-1][:160])
    raise Outcome("other", f"exit {code}: {err.strip()[-160:]}")


@case("rundir", "grid.json on a full disk (RLIMIT_FSIZE)")
def _(w):
    out = w.tmp() / "grid"
    out.mkdir()
    (out / "grid.json").write_text('{"methods": ["previous"]}\n')
    script = (f"import resource, signal, sys\nsys.path.insert(0, {str(REPO)!r})\nfrom anchoropt.runner import cli\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nresource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
              f"sys.exit(cli.main({_grid_args(w, out)!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if (out / "grid.json").read_text() != '{"methods": ["previous"]}\n':
        raise Outcome("other", f"grid.json lost: {(out / 'grid.json').stat().st_size} bytes left")
    if proc.returncode == 2 and "grid.json" in proc.stderr and "Traceback" not in proc.stderr:
        raise Outcome("clear", proc.stderr.strip().splitlines()[-1][:160])
    raise Outcome("other", f"exit {proc.returncode}: {proc.stderr.strip()[-160:]}")


@case("rundir", "results.json copied into another seed's folder")
def _(w):
    out = w.tmp() / "grid"
    code, err = _quiet_main(_grid_args(w, out, seeds=("1", "2")))
    runs = out / "runs" / w.folder.name / "zeroshot"
    if code != 0:
        raise Outcome("other", f"the grid failed: {err.strip()[-120:]}")
    shutil.copy(runs / "seed1" / "results.json", runs / "seed2" / "results.json")
    from anchoropt.runner.grid import report_grid

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        report_grid(out, plot=False)
    seeds = sorted(r["seed"] for r in json.loads((out / "results.json").read_text()))
    said = [str(c.message) for c in caught if "seed2" in str(c.message)]
    if seeds == [1] and said:
        raise Outcome("correct", said[0][:140])
    raise Outcome("other", f"reported seeds {seeds}" + ("" if said else ", nothing said"))


@case("option", "grid --data DIR and DIR/ (one dataset twice)")
def _(w):
    cli(_grid_args(w, w.tmp() / "grid", str(w.folder), f"{w.folder}/"), "twice", str(w.folder))


@case("option", "grid over two datasets both named mini")
def _(w):
    from anchoropt.datasets import folders as D

    root = w.tmp()
    a = D.make_synthetic_image_folder(root / "a" / "mini", per_class=8, size=32, seed=1)
    b = D.make_synthetic_image_folder(root / "b" / "mini", ["red", "green", "blue", "black"], per_class=8, size=32,
                                      seed=2)
    out = root / "grid"
    code, err = _quiet_main(_grid_args(w, out, a, b))
    if code != 0:
        raise Outcome("other", f"exit {code}: {err.strip()[-140:]}")
    names = [r["dataset"] for r in json.loads((out / "results.json").read_text())]
    if len(set(names)) == 2:
        raise Outcome("correct", f"reported apart as {names}")
    raise Outcome("other", f"reported as {names}: averaged together")


@case("option", "train --output in a read-only folder")
def _(w):
    ro = w.tmp() / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes into a 0500 folder: a read-only file system (EROFS) stands in
        real = Path.mkdir

        def read_only(self, *args, **kwargs):
            if ro in self.parents:
                raise OSError(30, "Read-only file system", str(self))
            return real(self, *args, **kwargs)

        Path.mkdir = read_only
        try:
            cli(w.train_args(ro / "run"), str(ro), "read-only")
        finally:
            Path.mkdir = real
    ro.chmod(0o500)
    try:
        cli(w.train_args(ro / "run"), str(ro), "writable")
    finally:
        ro.chmod(0o700)


@case("option", "grid --output under a regular file")
def _(w):
    blocker = w.tmp() / "file"
    blocker.write_text("x")
    cli(_grid_args(w, blocker / "grid"), str(blocker), "not a directory")


@case("option", "train on a full disk (ENOSPC while writing)")
def _(w):
    from anchoropt import _files

    def full(fd):
        raise OSError(28, "No space left on device")

    out = w.tmp() / "run"
    real, _files.os.fsync = _files.os.fsync, full
    try:
        cli(w.train_args(out), str(out), "no space left", no_model=False)
    finally:
        _files.os.fsync = real


# ---------------------------------------------------------------------- interruptions (subprocess kills)
_SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
from anchoropt import AnchorOPTPromptLearner
from anchoropt.testing import tiny_open_clip
m = tiny_open_clip()
learners = []
for seed in (1, 2):
    torch.manual_seed(seed)
    learners.append(AnchorOPTPromptLearner(m, ["cat", "dog"], torch.randn(1, 64), n_soft=4))
learners[0].save_pretrained({out!r})
print("READY", flush=True)
i = 1
while True:
    learners[i % 2].save_pretrained({out!r})
    i += 1
"""


def kill_resaves(w: World, kills: int, rng: random.Random) -> dict:
    """Kill a process re-saving two learners alternately into one directory at random moments; after each kill
    the directory must load as one of the two complete saves."""
    torch = w.torch
    expected = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected.append(torch.randn(1, 64))
    tally = {"old_or_new": 0, "mixed": 0, "unloadable": 0}
    for k in range(kills):
        out = w.tmp() / "learner"
        proc = subprocess.Popen([sys.executable, "-c", _SAVER.format(repo=str(REPO), out=str(out))],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()  # READY: the first save is complete
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = _load(w, out)
        except Exception:  # noqa: BLE001
            tally["unloadable"] += 1
            continue
        anchors = loaded.anchors.cpu()
        state = [s for s in range(2) if torch.equal(anchors, expected[s])]
        if not state:
            tally["mixed"] += 1
            continue
        torch.manual_seed(state[0] + 1)
        from anchoropt import AnchorOPTPromptLearner

        reference = AnchorOPTPromptLearner(w.model, ["cat", "dog"], torch.randn(1, 64), n_soft=4)
        same = all(torch.equal(loaded.state_dict()[n].cpu(), t) for n, t in reference.state_dict().items())
        tally["old_or_new" if same else "mixed"] += 1
    return tally


def kill_reruns(w: World, kills: int, rng: random.Random) -> dict:
    """Kill `anchoropt train` re-running into a finished run directory at random moments, then `eval` it: the
    eval must refuse the directory or report the run it holds (no mix labelled with the new seed)."""
    tally = {"refused_or_consistent": 0, "mix_accepted": 0, "eval_messages": []}
    new_flag = "--overwrite" in subprocess.run([sys.executable, "-m", "anchoropt", "train", "--help"],
                                               capture_output=True, text=True, cwd=REPO).stdout
    for k in range(kills):
        out = w.trained_run(seed=1)
        first_weights = (out / "prompt_learner" / "anchoropt.safetensors").read_bytes()
        args = [sys.executable, "-m", "anchoropt", *w.train_args(out, "--seed", "2", "--epochs", "3"),
                *(["--overwrite"] if new_flag else [])]
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ev = subprocess.run([sys.executable, "-m", "anchoropt", "eval", str(out), "--no-progress"], cwd=REPO,
                            capture_output=True, text=True)
        tally["eval_messages"].append((ev.stderr.strip().splitlines() or ["ok"])[-1][:160])
        if ev.returncode != 0:
            tally["refused_or_consistent"] += 1
            continue
        labelled = json.loads((out / "eval_results.json").read_text())["seed"]
        weights = (out / "prompt_learner" / "anchoropt.safetensors").read_bytes()
        trained_by = 1 if weights == first_weights else 2
        tally["refused_or_consistent" if labelled == trained_by else "mix_accepted"] += 1
    return tally


# ---------------------------------------------------------------------- main
def main() -> None:
    global REPO
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout to probe")
    parser.add_argument("--kills", type=int, default=20, help="interrupted re-saves (subprocess kills)")
    parser.add_argument("--rerun-kills", type=int, default=5, help="interrupted re-runs into a finished run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/results/probe_faults.json)")
    args = parser.parse_args()
    REPO = Path(args.repo).resolve()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        for area, kind, function in CASES:
            try:
                function(world)
                outcome = Outcome("other", "probe ended without a verdict")
            except Outcome as result:
                outcome = result
            except BaseException as err:  # noqa: BLE001 - a crash of the case itself
                outcome = Outcome("other", "probe crashed: " + "".join(
                    traceback.format_exception_only(type(err), err)).strip()[:140])
            rows.append({"area": area, "kind": kind, "outcome": outcome.kind, "detail": outcome.detail})
            print(f"{outcome.kind:8s} {area:7s} {kind:48s} {outcome.detail[:110]}", flush=True)
        rng = random.Random(args.seed)
        resaves = kill_resaves(world, args.kills, rng) if args.kills else {}
        reruns = kill_reruns(world, args.rerun_kills, rng) if args.rerun_kills else {}
    tallies = {k: sum(r["outcome"] == k for r in rows) for k in ("clear", "correct", "other")}
    print(f"\nkinds tried: {len(rows)} | clear error: {tallies['clear']} | accepted correctly: {tallies['correct']} | "
          f"other: {tallies['other']}")
    if resaves:
        print(f"re-save killed {args.kills}x at random moments: {resaves}")
    if reruns:
        print(f"re-run into a finished run killed {args.rerun_kills}x, then eval: {reruns}")
    path = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / "probe_faults.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"repo": str(REPO), "kinds": len(rows), "tallies": tallies, "resave_kills": resaves,
                                "rerun_kills": reruns, "cases": rows}, indent=2) + "\n")


REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    main()
