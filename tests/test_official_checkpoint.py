"""Reading the authors' Dassl anchor checkpoints without executing pickled code."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from anchoropt import official
from anchoropt.official import (
    CheckpointError,
    UnsafeCheckpointError,
    load_official_anchors,
    read_dassl_state_dict,
)

# L2 norms of the released anchors (documented; checked to 0.01).
_REAL = {"Caltech101": 1.36, "EuroSAT": 0.77}
_REAL_GLOBALS = {
    "builtins.dict",
    "collections.defaultdict",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.sgd.SGD",
}


def _real(shared_data: Path, name: str) -> Path:
    """An authors' checkpoint from the ``shared_data`` fixture's folder (conftest.py); skips when absent."""
    path = shared_data / "official_anchors" / f"{name}_anchor.pth.tar"
    if not path.is_file():
        pytest.skip(f"authors' checkpoint {path} absent (set ANCHOROPT_SHARED_DATA to the shared/data folder)")
    return path


# ---------------------------------------------------------------- real files


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(_REAL))
def test_real_checkpoint_loads(shared_data: Path, name: str) -> None:
    path = _real(shared_data, name)
    # The point of this module: plain weights-only loading refuses these files.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) == _REAL_GLOBALS

    anchors = load_official_anchors(path, expected_width=512)
    assert anchors.shape == (1, 512)
    assert anchors.dtype == torch.float32
    assert torch.isfinite(anchors).all()
    assert anchors.norm().item() == pytest.approx(_REAL[name], abs=0.01)

    sd = read_dassl_state_dict(path)
    assert {"anchor_ctx_1", "token_prefix"} <= set(sd)
    assert sd["anchor_ctx_1"].dtype == torch.float16
    assert sd["anchor_ctx_1"].device.type == "cpu"  # stored as cuda:0


@pytest.mark.shared_data
def test_real_checkpoint_wrong_width(shared_data: Path) -> None:
    with pytest.raises(CheckpointError, match=r"(?s)512.*768.*another CLIP text width"):
        load_official_anchors(_real(shared_data, "EuroSAT"), expected_width=768)


# ---------------------------------------------------------------- synthetic files


def _save(path: Path, state_dict: dict | None = None, **extra: object) -> Path:
    obj: dict = dict(extra)
    if state_dict is not None:
        obj["state_dict"] = OrderedDict(state_dict)
    torch.save(obj, path)
    return path


def _dassl_like(path: Path, anchor: torch.Tensor) -> Path:
    """A checkpoint shaped like the authors': SGD state dict plus pickled SGD/scheduler objects."""
    param = torch.nn.Parameter(anchor.clone())
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return _save(
        path,
        {"anchor_ctx_1": anchor.half(), "token_prefix": torch.zeros(3, 1, 512).half()},
        optimizer=opt.state_dict(),
        scheduler={"successor": sched, "warmup_epoch": 1},
        epoch=3,
        val_result=None,
    )


def test_synthetic_dassl_checkpoint_loads_without_building_optimizer(tmp_path: Path, monkeypatch) -> None:
    anchor = torch.randn(2, 512)
    path = _dassl_like(tmp_path / "model.pth.tar", anchor)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) == _REAL_GLOBALS

    built: list[str] = []
    for cls in (torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR):
        monkeypatch.setattr(cls, "__setstate__", lambda self, s, n=cls.__name__: built.append(n), raising=False)
    safe_before = torch.serialization.get_safe_globals()

    out = load_official_anchors(path, expected_width=512)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, anchor.half().float())
    assert built == []  # the real optimizer/scheduler classes were never instantiated
    assert set(torch.serialization.get_safe_globals()) == set(safe_before)  # our stand-ins were removed again


def test_plain_optimizer_state_dict_checkpoint(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(1, 512))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    path = _save(tmp_path / "c.pth", {"anchor_ctx_1": param.detach()}, optimizer=opt.state_dict(), epoch=3)
    torch.testing.assert_close(load_official_anchors(path), param.detach())


class _Payload:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _malicious(path: Path, marker: Path, via: str) -> Path:
    if via == "os.system":
        payload = _Payload(os.system, f"touch '{marker}'")
    else:
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').write('ran')")
    return _save(path, {"anchor_ctx_1": torch.zeros(1, 512)}, epoch=payload)


@pytest.mark.parametrize("via", ["os.system", "exec"])
def test_malicious_checkpoint_refused_and_payload_not_run(tmp_path: Path, via: str) -> None:
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "evil.pth", marker, via)
    with pytest.raises(UnsafeCheckpointError, match="refuse to run") as info:
        load_official_anchors(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()

    # Control: the payload is live, so the assertion above could fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_torch_unpickler_still_refuses_if_prescan_misses(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "evil.pth", marker, "exec")
    monkeypatch.setattr(official, "_MAPPED", official._MAPPED | {"builtins.exec"})
    with pytest.raises(UnsafeCheckpointError, match="refuse to run"):
        read_dassl_state_dict(path)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth.tar"
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_official_anchors(path)


def test_random_bytes_and_truncated_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        read_dassl_state_dict(junk)

    good = _dassl_like(tmp_path / "good.pth", torch.randn(1, 512)).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        read_dassl_state_dict(cut)


def test_zip_that_is_not_a_torch_checkpoint(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_dassl_state_dict(path)


def test_missing_state_dict_reported(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.pth", None, model={"anchor_ctx_1": torch.zeros(1, 512)}, epoch=1)
    with pytest.raises(CheckpointError, match=r"no 'state_dict'.*'epoch', 'model'"):
        read_dassl_state_dict(path)

    torch.save(torch.zeros(1, 512), tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="not a Dassl checkpoint"):
        read_dassl_state_dict(tmp_path / "t.pth")


def test_anchor_key_selection(tmp_path: Path) -> None:
    a, b = torch.randn(1, 512), torch.randn(3, 512)
    two = _save(tmp_path / "two.pth", {"anchor_ctx_1": a, "anchor_ctx_2": b, "token_prefix": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"2 keys.*anchor_ctx_1.*anchor_ctx_2.*pass key="):
        load_official_anchors(two)
    torch.testing.assert_close(load_official_anchors(two, key="anchor_ctx_2"), b)
    with pytest.raises(CheckpointError, match=r"'ctx' not in the state_dict.*anchor_ctx_1"):
        load_official_anchors(two, key="ctx")

    none = _save(tmp_path / "none.pth", {"ctx": a, "token_prefix": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"no key matching 'anchor_ctx\*'.*\['ctx', 'token_prefix'\]"):
        load_official_anchors(none)

    prefixed = _save(tmp_path / "pre.pth", {"anchor_prompt_learner.anchor_ctx_1": a})
    torch.testing.assert_close(load_official_anchors(prefixed), a)


@pytest.mark.parametrize("shape", [(512,), (1, 1, 512), (0, 512)])
def test_anchor_shape_must_be_n_by_width(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = _save(tmp_path / "c.pth", {"anchor_ctx_1": torch.zeros(shape)})
    with pytest.raises(CheckpointError, match=r"shape .*expected anchors of shape \(N, width\)"):
        load_official_anchors(path)


def test_wrong_width_synthetic(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.pth", {"anchor_ctx_1": torch.zeros(1, 768)})
    assert load_official_anchors(path, expected_width=768).shape == (1, 768)
    with pytest.raises(CheckpointError, match=r"width 768 .*text width is 512.*another CLIP text width"):
        load_official_anchors(path, expected_width=512)


def test_non_finite_anchor_rejected(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.pth", {"anchor_ctx_1": torch.tensor([[0.0, float("nan")]])})
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_official_anchors(path)


def test_old_torch_gives_clear_error(tmp_path: Path, monkeypatch) -> None:
    path = _save(tmp_path / "c.pth", {"anchor_ctx_1": torch.zeros(1, 512)})
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(RuntimeError, match=r"torch >= 2.6 \(found 2.5.1\)"):
        load_official_anchors(path)
