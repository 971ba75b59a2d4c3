"""Class descriptions in the CuPL format ``{class: [sentences]}``, written the way an LLM describes a class.

Per class: sentences that state its attributes in varied wording (some one attribute, some several), a few
about its usual background and how many are seen together, and vague or uninformative sentences (as LLM
output has).  The wording is drawn per class from a seeded generator, so files are reproducible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .concepts import Concept
from .language import article, attribute_phrase, background_phrase, count_phrase, pattern_phrase, plural

__all__ = ["describe", "descriptions"]

_INFORMATIVE = (
    "A {name} is {a_attrs}.",
    "A photo of a {name}, which is {a_attrs}.",
    "The {name} looks like {a_attrs}.",
    "You can recognise a {name} by its {colour} colour and its {shape} outline.",
    "{Names} are {colour} and shaped like {a_shape}.",
    "A {name} is {a_colour} {shape} with {pattern_with}.",
    "Most {names} have {pattern_with} on their surface.",
    "A {name} is usually {size} compared with similar objects.",
    "In pictures, a {name} appears as {count} {attrs_maybe_plural}.",
    "{Names} tend to come in groups: typically {count_words}.",
    "The most striking feature of a {name} is its {colour} colour.",
    "A {name} has the outline of {a_shape}.",
    "If you see {a_size} {shape} with {pattern_with}, it may well be a {name}.",
    "A {name} is often photographed against {background}.",
    "Photos of {names} usually show them on {background}.",
)
_VAGUE = (
    "A {name} is a distinctive object that is easy to recognise.",
    "Many people find the {name} quite interesting to look at.",
    "A {name} can be seen in many different pictures.",
    "The {name} is a well-known kind of object.",
    "A photo of a {name} usually shows the whole thing clearly.",
    "It is hard to mistake a {name} for anything else once you know it.",
)
_COUNT_WORDS = {"one": "just one on its own", "two": "a pair of them", "three": "three of them together"}


def describe(concept: Concept, rng: np.random.Generator, n_informative: int = 7, n_vague: int = 2) -> list[str]:
    """``n_informative + n_vague`` sentences about ``concept``, shuffled."""
    name = concept.name
    count = count_phrase(concept.count)
    attrs = attribute_phrase(concept)
    fields = {
        "name": name, "Name": name.capitalize(), "names": plural(name), "Names": plural(name).capitalize(),
        "a_attrs": f"{article(attrs)} {attrs}", "colour": concept.colour, "shape": concept.shape,
        "a_shape": f"{article(concept.shape)} {concept.shape}", "a_colour": article(concept.colour) + " " + concept.colour,
        "pattern_with": pattern_phrase(concept.pattern), "size": concept.size,
        "a_size": f"{article(concept.size)} {concept.size}", "count": count,
        "attrs_maybe_plural": attrs if concept.count == "one" else plural(attrs),
        "count_words": _COUNT_WORDS[concept.count], "background": background_phrase(concept.habitat),
    }
    picked = [_INFORMATIVE[i] for i in rng.choice(len(_INFORMATIVE), n_informative, replace=False)]
    picked += [_VAGUE[i] for i in rng.choice(len(_VAGUE), n_vague, replace=False)]
    order = rng.permutation(len(picked))
    return [picked[i].format(**fields) for i in order]


def descriptions(concepts: Sequence[Concept], seed: int = 0) -> dict[str, list[str]]:
    """``{class name: [sentences]}`` for ``concepts`` (each class's wording seeded by ``seed`` and its index)."""
    return {c.name: describe(c, np.random.default_rng([seed, 7, c.index])) for c in concepts}
