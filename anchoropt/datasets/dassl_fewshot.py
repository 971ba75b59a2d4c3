"""Dassl's few-shot images for a seed: ``split_fewshot/shot_{K}-seed_{S}.pkl``, read without unpickling code.

Every CoOp / CoCoOp / MaPLe run writes, in each dataset folder, the K-shot training (and ``min(K, 4)``-shot
validation) images it drew for its seed (CoOp's ``datasets/*.py``)::

    pickle.dump({"train": [Datum, ...], "val": [Datum, ...]}, f, protocol=pickle.HIGHEST_PROTOCOL)

(ImageNet's file has ``"train"`` alone.)  A ``Datum`` is ``dassl.data.datasets.base_dataset.Datum``, whose
state is ``{"_impath": str (the absolute path where the file was written), "_label": int, "_domain": int,
"_classname": str}``.

:func:`read_fewshot_file` reads such a file with a restricted unpickler: ``Datum`` becomes the plain record
:class:`DasslDatum` (never Dassl's class, which needs not be installed), and any other class or callable in the
file is refused, so nothing in it is run.  :func:`dassl_few_shot` maps the records onto a dataset read here
(by the path's tail under the dataset folder, since the files move between machines) and checks their class
names, giving the same K-shot training set as Dassl's run.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

from . import folders as F
from .folders import DatasetSplits, Record

__all__ = ["DasslDatum", "UnsafePickleError", "fewshot_path", "available_fewshot", "read_fewshot_file",
           "dassl_few_shot"]

FEWSHOT_DIR = "split_fewshot"


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle asks for a class or callable outside the allow-list; nothing from it was run."""


class DasslDatum:
    """What a pickled Dassl ``Datum`` is read as: its four fields, checked (``impath`` text, ``label`` int)."""

    __slots__ = ("impath", "label", "domain", "classname")

    def __init__(self, impath: str = "", label: int = 0, domain: int = 0, classname: str = ""):
        self.impath, self.label, self.domain, self.classname = impath, label, domain, classname

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:  # (dict, no slots)
            state = state[0]
        if not isinstance(state, dict):
            raise UnsafePickleError(f"a Datum's state must be a dict, got {type(state).__name__}")
        values = {key.lstrip("_"): value for key, value in state.items() if isinstance(key, str)}
        impath, label = values.get("impath"), values.get("label")
        classname, domain = values.get("classname", ""), values.get("domain", 0)
        if not (isinstance(impath, str) and isinstance(label, int) and not isinstance(label, bool)
                and isinstance(classname, str) and isinstance(domain, int)):
            raise UnsafePickleError(f"a Datum holds impath (text), label (integer), classname (text); got {state!r}")
        self.__init__(impath, label, domain, classname)

    def __repr__(self) -> str:
        return f"DasslDatum({self.impath!r}, {self.label}, {self.classname!r})"


def _reconstructor(cls, base, state):
    """Protocol 0 / 1 pickles build objects through ``copyreg._reconstructor``: only a :class:`DasslDatum`."""
    if cls is not DasslDatum or base is not object or state is not None:
        raise UnsafePickleError("copyreg._reconstructor is allowed only to build a Datum")
    return DasslDatum()


_ALLOWED = {
    ("dassl.data.datasets.base_dataset", "Datum"): DasslDatum,
    ("dassl.data.datasets", "Datum"): DasslDatum,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,  # protocol 0 / 1 name it as Python 2 did
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused {module}.{name}: a Dassl few-shot file holds only "
                                    "dassl.data.datasets.base_dataset.Datum records") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refused a persistent id: a Dassl few-shot file has none")


def fewshot_path(root: str | os.PathLike, shots: int, seed: int) -> Path:
    """``root/split_fewshot/shot_{shots}-seed_{seed}.pkl`` (CoOp's name)."""
    return Path(root) / FEWSHOT_DIR / f"shot_{shots}-seed_{seed}.pkl"


def available_fewshot(root: str | os.PathLike) -> list[tuple[int, int]]:
    """``(shots, seed)`` of the few-shot files in ``root/split_fewshot`` (sorted)."""
    folder = Path(root) / FEWSHOT_DIR
    found = []
    if folder.is_dir():
        for path in folder.glob("shot_*-seed_*.pkl"):
            shots, _, seed = path.stem[len("shot_"):].partition("-seed_")
            if shots.isdigit() and seed.isdigit():
                found.append((int(shots), int(seed)))
    return sorted(found)


def read_fewshot_file(path: str | os.PathLike) -> dict[str, list[DasslDatum]]:
    """``{"train": [DasslDatum, ...], "val": [...]}`` of a Dassl few-shot pickle, read without running code.

    Raises :class:`UnsafePickleError` for anything but Datum records in a dict of lists, ``ValueError`` for a
    damaged file, ``FileNotFoundError`` when it is absent.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"Dassl few-shot file not found: {path}") from None
    except UnsafePickleError as err:
        raise UnsafePickleError(f"refusing {path}: {err}; nothing from the file was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path} is not a readable Dassl few-shot file ({type(err).__name__}: {err}); delete it "
                         "and let Dassl write it again, or drop --shots-from dassl") from None
    if not isinstance(data, dict) or "train" not in data or set(data) - {"train", "val"}:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a Dassl few-shot file: expected a dict with 'train' (and 'val'), got {keys}")
    for split, items in data.items():
        if not isinstance(items, list) or not all(isinstance(item, DasslDatum) for item in items):
            raise ValueError(f"{path}: {split!r} must be a list of Datum records")
    return data


def dassl_few_shot(dataset: DatasetSplits, shots: int, seed: int) -> DatasetSplits:
    """``dataset`` with the training (and validation) images Dassl drew for ``shots`` and ``seed``.

    The file is ``dataset.root/split_fewshot/shot_{shots}-seed_{seed}.pkl``.  Each Datum's path is matched to
    the image of the same split whose path under the dataset folder ends the Datum's path (Dassl stores
    absolute paths), and its class name must be the image's; order and repeats are kept as in the file.  Without
    ``"val"`` in the file (ImageNet) the validation split stays whole, as in CoOp.
    """
    path = fewshot_path(dataset.root, shots, seed)
    if not path.is_file():
        have = available_fewshot(dataset.root)
        raise FileNotFoundError(
            f"no Dassl few-shot file for {shots} shots and seed {seed}: {path} is absent"
            + (f"; {path.parent} holds (shots, seed) {have}" if have else f"; {path.parent} holds none")
            + ": run Dassl / CoOp once with these settings, or drop --shots-from dassl to draw the shots here")
    data = read_fewshot_file(path)
    out = {"train": _match(data["train"], dataset.train, dataset, path, "train")}
    if "val" in data:
        out["val"] = _match(data["val"], dataset.val, dataset, path, "val")
    missing = sorted({r.classname for r in dataset.train} - {r.classname for r in out["train"]})
    if missing:
        raise ValueError(f"{path} has no training image of {len(missing)} class(es) of {dataset.name}, e.g. "
                         f"{missing[:5]}: it was written for another split of the dataset")
    return replace(dataset, **out)


def _match(items: list[DasslDatum], records: list[Record], dataset: DatasetSplits, path: Path,
           split: str) -> list[Record]:
    """The records of ``records`` the Datum paths name (by path tail), checked class by class."""
    by_file: dict[str, list[tuple[tuple[str, ...], Record]]] = {}
    for record in records:
        parts = Path(record.path).parts
        by_file.setdefault(parts[-1], []).append((parts, record))
    out = []
    for item in items:
        wanted = Path(item.impath.replace("\\", "/")).parts
        found = None
        for parts, record in by_file.get(wanted[-1] if wanted else "", []):
            common = 0
            while common < min(len(parts), len(wanted)) and parts[-1 - common] == wanted[-1 - common]:
                common += 1
            if found is None or common > found[0]:
                found = (common, record)
        if found is None:
            raise ValueError(f"{path}: {split} image {item.impath!r} is not in the {split} split of {dataset.name} "
                             f"({dataset.root}): the file was written for another split or dataset")
        record = found[1]
        if F._clean_name(item.classname) != record.classname:
            raise ValueError(f"{path}: {item.impath!r} is class {item.classname!r} there but "
                             f"{record.classname!r} here: the file was written for another split or class list")
        out.append(record)
    return out
