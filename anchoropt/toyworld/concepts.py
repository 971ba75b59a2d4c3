"""The toy world's concepts: attribute axes, and classes with invented names bound to attribute bundles.

The world is fixed (built from :data:`WORLD_SEED`, the same for every user and for the shipped model):
``N_GROUPS`` disjoint groups of ``GROUP_SIZE`` classes.  Each class has

* an atomic invented name (lower-case letters, 1-4 CLIP BPE tokens, never an attribute word),
* a bundle of defining attributes - shape, colour, pattern, size, count - that no other class shares,
* a habitat: the background it is usually seen on (a soft attribute; other backgrounds also occur).

Classes come in clusters of fine-grained neighbours (a root bundle and 1-3 classes that differ from it in
exactly one attribute), and each group's class order is shuffled, so neighbours fall on both sides of the
base / novel cut.  ``make(..., seed=S)`` only changes the images drawn; the classes never change.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "AXES", "SHAPES", "COLOURS", "PATTERNS", "SIZES", "COUNTS", "BACKGROUNDS", "ATTRIBUTE_WORDS",
    "Concept", "world", "group", "concept_by_name", "frequency_rank", "WORLD_SEED", "N_GROUPS", "GROUP_SIZE",
]

WORLD_SEED = 0
N_GROUPS = 3
GROUP_SIZE = 120

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
COLOURS = {  # name -> RGB in [0, 1]
    "red": (0.85, 0.12, 0.10), "orange": (0.95, 0.55, 0.05), "yellow": (0.92, 0.86, 0.10),
    "green": (0.15, 0.70, 0.20), "cyan": (0.10, 0.78, 0.82), "blue": (0.12, 0.25, 0.88),
    "purple": (0.55, 0.18, 0.75), "pink": (0.98, 0.50, 0.72),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
COUNTS = ("one", "two", "three")
BACKGROUNDS = ("dark", "light", "speckled", "gradient")
AXES = ("shape", "colour", "pattern", "size", "count")
"""Defining attribute axes (the background is a habitat, not part of a class's identity)."""

ATTRIBUTE_WORDS = frozenset(
    SHAPES + tuple(COLOURS) + PATTERNS + SIZES + COUNTS + BACKGROUNDS
    + ("color", "colour", "shape", "pattern", "size", "background", "single", "pair", "stripes", "dots",
       "checks", "object", "photo", "sketch", "a", "of", "the")
)
"""Words a class name must never be (nor contain as a whole word)."""

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr",
           "pl", "sn", "tr", "zw", "qu", "th", "sk")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai", "ee", "ou")
_CODAS = ("", "", "", "n", "r", "l", "x", "k", "m", "sh", "t")


@dataclass(frozen=True)
class Concept:
    """One class of the world: an invented name bound to attributes.

    Attributes:
        index: position in the whole world (stable id, used to seed its images).
        name: the class name (one invented word).
        group: the disjoint class group (cross-dataset transfer) it belongs to.
        shape, colour, pattern, size, count: the defining attributes.
        habitat: the background it is usually seen on.
        cluster: id of its fine-grained neighbour cluster.
    """

    index: int
    name: str
    group: int
    shape: str
    colour: str
    pattern: str
    size: str
    count: str
    habitat: str
    cluster: int

    def bundle(self) -> tuple[str, ...]:
        """The defining attributes, in :data:`AXES` order."""
        return tuple(getattr(self, axis) for axis in AXES)

    def to_json(self) -> dict:
        return asdict(self)


def _axis_values(axis: str) -> tuple[str, ...]:
    return {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": SIZES, "count": COUNTS}[axis]


def _invent_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pronounceable invented words of 2-3 syllables (4-8 letters)."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        syllables = 2 + int(rng.random() < 0.25)
        word = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syllables))
        word += str(rng.choice(_CODAS))
        if not 4 <= len(word) <= 8 or word in seen or any(a in word for a in _FORBIDDEN_PARTS):
            continue
        seen.add(word)
        names.append(word)
    return names


# substrings that would make a name look like (or tokenise like) an attribute word
_FORBIDDEN_PARTS = tuple(sorted(w for w in ATTRIBUTE_WORDS if len(w) >= 3))


def _random_bundle(rng: np.random.Generator) -> tuple[str, ...]:
    return tuple(str(rng.choice(_axis_values(axis))) for axis in AXES)


@functools.lru_cache(maxsize=None)
def world() -> tuple[Concept, ...]:
    """All ``N_GROUPS * GROUP_SIZE`` concepts of the world, group by group, each group in its class order."""
    rng = np.random.default_rng(WORLD_SEED)
    names = iter(_invent_names(rng, N_GROUPS * GROUP_SIZE))
    used: set[tuple[str, ...]] = set()
    concepts: list[Concept] = []
    cluster_id = 0
    for g in range(N_GROUPS):
        members: list[tuple[tuple[str, ...], str, int]] = []
        while len(members) < GROUP_SIZE:
            root = _random_bundle(rng)
            if root in used:
                continue
            cluster = [root]
            for _ in range(int(rng.integers(1, 4))):  # 1-3 neighbours differing in one attribute
                axis = int(rng.integers(len(AXES)))
                values = [v for v in _axis_values(AXES[axis]) if v != root[axis]]
                neighbour = root[:axis] + (str(rng.choice(values)),) + root[axis + 1:]
                if neighbour not in used and neighbour not in cluster:
                    cluster.append(neighbour)
            cluster = cluster[: GROUP_SIZE - len(members)]
            for bundle in cluster:
                used.add(bundle)
                members.append((bundle, str(rng.choice(BACKGROUNDS)), cluster_id))
            cluster_id += 1
        order = rng.permutation(len(members))
        for i in order:
            bundle, habitat, cid = members[int(i)]
            concepts.append(Concept(len(concepts), next(names), g, *bundle, habitat=habitat, cluster=cid))
    return tuple(concepts)


def group(g: int) -> tuple[Concept, ...]:
    """The classes of group ``g`` in their label order."""
    if not isinstance(g, int) or not 0 <= g < N_GROUPS:
        raise ValueError(f"group must be an int in 0..{N_GROUPS - 1}, got {g!r}")
    return tuple(c for c in world() if c.group == g)


def concept_by_name() -> dict[str, Concept]:
    """``{name: Concept}`` for the whole world."""
    return {c.name: c for c in world()}


@functools.lru_cache(maxsize=None)
def _frequency_ranks() -> tuple[int, ...]:
    """A fixed shuffle of the world: rank 0 is the most frequent name on the toy web."""
    order = np.random.default_rng([WORLD_SEED, 99]).permutation(N_GROUPS * GROUP_SIZE)
    ranks = np.empty_like(order)
    ranks[order] = np.arange(len(order))
    return tuple(int(r) for r in ranks)


def frequency_rank(concept: Concept) -> int:
    """How common ``concept``'s name is in pretraining captions (0: the most common; see :mod:`captions`)."""
    return _frequency_ranks()[concept.index]
