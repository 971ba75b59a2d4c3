"""Words for attributes: the phrases captions and descriptions are assembled from."""

from __future__ import annotations

from .concepts import Concept

__all__ = ["article", "plural", "pattern_phrase", "count_phrase", "background_phrase", "attribute_phrase"]

_PATTERN_WITH = {"plain": "no pattern", "striped": "stripes", "dotted": "dots", "checkered": "a checkered pattern"}
_COUNT = {"one": "a single", "two": "two", "three": "three"}
_BACKGROUND = {"dark": "a dark background", "light": "a light background",
               "speckled": "a speckled background", "gradient": "a gradient background"}


def article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh")) else "s")


def pattern_phrase(pattern: str) -> str:
    """What an object "has": ``"stripes"``, ``"dots"`` ..."""
    return _PATTERN_WITH[pattern]


def count_phrase(count: str) -> str:
    return _COUNT[count]


def background_phrase(background: str) -> str:
    return _BACKGROUND[background]


def attribute_phrase(concept: Concept, axes: tuple[str, ...] = ("size", "colour", "pattern", "shape")) -> str:
    """A noun phrase for some of ``concept``'s attributes, e.g. ``"small red striped circle"``.

    The shape is the head noun (``"object"`` when not among ``axes``); ``plain`` is left unsaid.
    """
    words = []
    for axis in ("size", "colour", "pattern"):
        if axis in axes and not (axis == "pattern" and concept.pattern == "plain"):
            words.append(getattr(concept, axis))
    words.append(concept.shape if "shape" in axes else "object")
    return " ".join(words)
