"""Dassl's own few-shot files and sampler against ours (opt-in, like the other real-peer tests).

Set ``ANCHOROPT_PEERS_DIR`` to a folder holding a checkout named ``Dassl.pytorch`` (KaiyangZhou/Dassl.pytorch).
Dassl's ``base_dataset.py`` is loaded from it as ``dassl.data.datasets.base_dataset`` (its ``gdown`` and
``dassl.utils`` imports stubbed: only downloads use them), so the pickles below hold Dassl's real ``Datum`` and
are drawn by Dassl's real ``generate_fewshot_dataset``, the way CoOp's ``datasets/oxford_pets.py`` writes
``split_fewshot/shot_K-seed_S.pkl``: ``random.seed(S)`` (CoOp's ``set_random_seed``), K shots of the train split,
``min(K, 4)`` of the val split, ``pickle.dump({"train": ..., "val": ...}, protocol=HIGHEST_PROTOCOL)``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import random
import sys
import types
from pathlib import Path

import pytest

from anchoropt.datasets import dassl_fewshot, layouts
from anchoropt.datasets import folders as D
from coop_layouts import make_layout

PEERS = os.environ.get("ANCHOROPT_PEERS_DIR")
BASE_DATASET = Path(PEERS or "", "Dassl.pytorch", "dassl", "data", "datasets", "base_dataset.py")
pytestmark = pytest.mark.skipif(not BASE_DATASET.is_file(),
                                reason="set ANCHOROPT_PEERS_DIR to a folder with a Dassl.pytorch checkout")


@pytest.fixture
def dassl_base_dataset(monkeypatch):
    """Dassl's ``base_dataset`` module, importable under its own name while the test runs."""
    names = ["dassl", "dassl.data", "dassl.data.datasets"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    utils = types.ModuleType("dassl.utils")
    utils.check_isfile = os.path.isfile
    monkeypatch.setitem(sys.modules, "dassl.utils", utils)
    monkeypatch.setitem(sys.modules, "gdown", types.ModuleType("gdown"))
    spec = importlib.util.spec_from_file_location("dassl.data.datasets.base_dataset", BASE_DATASET)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _dassl_fewshot_file(base, dataset: D.DatasetSplits, shots: int, seed: int) -> list[str]:
    """Write ``split_fewshot/shot_{shots}-seed_{seed}.pkl`` with Dassl's own code; the train picks' paths."""
    def data(records):
        return [base.Datum(impath=r.path, label=r.label, classname=r.classname) for r in records]

    sampler = base.DatasetBase.__new__(base.DatasetBase)  # its sampling methods use no instance state
    random.seed(seed)
    train = sampler.generate_fewshot_dataset(data(dataset.train), num_shots=shots)
    val = sampler.generate_fewshot_dataset(data(dataset.val), num_shots=min(shots, 4))
    path = Path(dataset.root).parent / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"
    if not path.parent.is_dir():
        path = Path(dataset.root) / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"
    with open(path, "wb") as file:
        pickle.dump({"train": train, "val": val}, file, protocol=pickle.HIGHEST_PROTOCOL)
    return [d.impath for d in train]


@pytest.mark.parametrize("shots, seed", [(2, 1), (4, 2), (1, 3)])
def test_the_reader_gives_the_images_dassl_pickled(dassl_base_dataset, tmp_path, shots, seed):
    root = make_layout(tmp_path, "oxford_pets", n_classes=3)
    dataset = layouts.open_dataset(root)
    picked = _dassl_fewshot_file(dassl_base_dataset, dataset, shots, seed)
    assert len(picked) == 3 * shots
    few = dassl_fewshot.dassl_few_shot(dataset, shots, seed)
    assert [r.path for r in few.train] == picked


@pytest.mark.parametrize("shots, seed", [(2, 1), (4, 2), (1, 3)])
def test_our_sampler_draws_what_dassl_draws_when_every_class_has_the_shots(dassl_base_dataset, tmp_path,
                                                                           shots, seed):
    root = make_layout(tmp_path, "oxford_pets", n_classes=3)
    dataset = layouts.open_dataset(root)
    picked = _dassl_fewshot_file(dassl_base_dataset, dataset, shots, seed)
    ours = D.sample_few_shot(dataset, shots, seed)
    assert [r.path for r in ours.train] == picked
