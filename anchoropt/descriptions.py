"""Class descriptions for Stage I: the ``{class name: [sentence, ...]}`` JSON format (CuPL / ATPrompt).

Keys are matched to class names with ``_`` read as a space and case ignored.  By default sentences without a
single letter (real files contain lone ``"."`` entries) are dropped *before* the first ``max_per_class`` are
taken; a class left with none is an error.  ``selection="released"`` takes the first ``max_per_class`` raw
entries instead, junk included, as the released Stage I does (in the CuPL files this changes the chosen
sentences of some classes: see the docs' "Released behaviour" notes).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Mapping, Sequence

from ._jsonfile import read_json

__all__ = ["load_descriptions", "DescriptionsError", "class_key", "SELECTIONS"]

SELECTIONS = ("usable", "released")


class DescriptionsError(ValueError):
    """A descriptions file or mapping that cannot be used; the message names the class and the problem."""


def load_descriptions(
    source: str | os.PathLike | Mapping[str, Sequence[str] | str],
    classnames: Sequence[str] | None = None,
    max_per_class: int | None = None,
    selection: str = "usable",
) -> dict[str, list[str]]:
    """Read and validate descriptions, ordered as ``classnames``.

    Args:
        source: a JSON file path, or an already-loaded mapping.
        classnames: classes to keep, in this order (all keys of the file when ``None``).  Every class
            must be present.
        max_per_class: keep the first ``n`` usable sentences per class in file order (the released code
            keeps 10; ``None`` keeps all).
        selection: ``"usable"`` (default): drop entries without a letter, then keep ``max_per_class``;
            ``"released"``: keep the first ``max_per_class`` raw entries (junk included), released behaviour.

    Returns:
        ``{classname: [sentence, ...]}`` with the caller's class names as keys.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the descriptions mapping"
    raw = (
        read_json(Path(source), f"descriptions file not found: {source}", DescriptionsError)
        if isinstance(source, (str, os.PathLike))
        else source
    )
    if not isinstance(raw, Mapping):
        raise DescriptionsError(f"{where} must be a JSON object {{class name: [sentences]}}, got {type(raw).__name__}")
    if selection not in SELECTIONS:
        raise DescriptionsError(f"unknown description selection {selection!r}; choose one of {SELECTIONS}")
    if max_per_class is not None and max_per_class < 1:
        raise DescriptionsError(f"max_per_class must be >= 1, got {max_per_class}")
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of class names, not a single string")
    by_key: dict[str, str] = {}
    for name in raw:
        if _key(name) in by_key:
            raise DescriptionsError(f"{where} has two entries for the same class: {by_key[_key(name)]!r} and {name!r}")
        by_key[_key(name)] = name
    wanted = list(raw) if classnames is None else list(classnames)
    missing = [c for c in wanted if _key(c) not in by_key]
    if missing:
        hints = [f"{c!r}{_closest(c, by_key)}" for c in missing[:5]]
        raise DescriptionsError(
            f"{where} has no descriptions for {len(missing)} class(es): {', '.join(hints)}"
            + (" ..." if len(missing) > 5 else "")
        )
    result = {}
    for name in wanted:
        file_key = by_key[_key(name)]
        entries = _entries(raw[file_key], file_key, where)
        if selection == "released":  # the first raw entries, junk included
            sentences = [entry.strip() for entry in entries]
        else:
            sentences = [entry.strip() for entry in entries if any(ch.isalpha() for ch in entry)]
            if not sentences:
                raise DescriptionsError(
                    f"{where}: class {file_key!r} has no usable description (none contains a letter)"
                )
        result[name] = sentences[:max_per_class] if max_per_class else sentences
    return result


def _entries(value, class_key: str, where: str) -> list[str]:
    """A class's raw entries, checked to be a non-empty list of strings."""
    if isinstance(value, str):  # some files hold one string per class
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DescriptionsError(
            f"{where}: class {class_key!r} must map to a list of sentences, got {type(value).__name__}"
        )
    if not value:
        raise DescriptionsError(f"{where}: class {class_key!r} has an empty list of descriptions")
    for i, sentence in enumerate(value):
        if not isinstance(sentence, str):
            raise DescriptionsError(
                f"{where}: description #{i} of class {class_key!r} is a {type(sentence).__name__}, not a string"
            )
    return list(value)


def _closest(name: str, by_key: dict[str, str]) -> str:
    """`` (closest: 'golden retriever')`` when the file has a near miss, else nothing."""
    match = difflib.get_close_matches(_key(name), list(by_key), n=1)
    return f" (closest: {by_key[match[0]]!r})" if match else ""


def class_key(name: str) -> str:
    """The form in which two class names count as the same class: ``_`` read as a space, case and repeated
    spaces ignored (``"Sea_Lion"`` and ``"sea  lion"`` are one class)."""
    return " ".join(str(name).replace("_", " ").lower().split())


_key = class_key
