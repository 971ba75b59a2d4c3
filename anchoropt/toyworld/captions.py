"""Pretraining captions: the text side of the toy world's image-text pairs.

A caption of an image of concept ``c`` (on background ``bg``) is one of four kinds, drawn with fixed
probabilities (:class:`CaptionMix`):

* ``name``       - the class name in a template: ``"a picture of a vina."``, ``"my vina."`` ...
* ``name_attr``  - the name together with (some of) its attributes: ``"a vina, a small purple circle."``
* ``attr``       - attributes only, any subset, with count and background: ``"two red striped squares on
  a dark background."``
* ``fact``       - a description-style sentence about the class (:func:`descriptions.describe` wording).

Every class's name is used, as real CLIP has seen the names of the "novel" classes of a benchmark.
Binding noise: with probability ``name_noise`` a caption's name is replaced by the name of a fine-grained
neighbour (another class of its cluster; a random class when it has none), as web captions are
sometimes wrong.  This is the main knob of how well names are bound to attributes, i.e. of zero-shot
accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .concepts import Concept
from .descriptions import describe
from .language import article, attribute_phrase, background_phrase, count_phrase, plural

__all__ = ["CaptionMix", "Captioner", "NAME_TEMPLATES"]

NAME_TEMPLATES = (
    "a {}.", "{}", "a picture of a {}.", "an image of the {}.", "this is a {}.", "my {}.",
    "a close-up of a {}.", "look at this {}!", "the {} in a picture.", "a good picture of a {}.",
)
"""Name-only caption templates.  The zero-shot hand prompt ``"a photo of a {}."`` is deliberately not one of
them (its words do occur in other captions): a hand prompt is a guess at how captions look, as with real
CLIP, which leaves a learned context (CoOp and its family) something to find."""


@dataclass(frozen=True)
class CaptionMix:
    """Probabilities of the caption kinds (normalised) and of binding noise."""

    name: float = 0.4
    name_attr: float = 0.2
    attr: float = 0.3
    fact: float = 0.1
    name_noise: float = 0.1

    def probabilities(self) -> np.ndarray:
        p = np.array([self.name, self.name_attr, self.attr, self.fact], dtype=np.float64)
        if (p < 0).any() or p.sum() <= 0 or not 0 <= self.name_noise <= 1:
            raise ValueError(f"caption probabilities must be >= 0 with a positive sum, name_noise in [0, 1]: {self}")
        return p / p.sum()


class Captioner:
    """Draws captions for images of ``concepts`` (indexed by position in ``concepts``)."""

    def __init__(self, concepts: Sequence[Concept], mix: CaptionMix = CaptionMix()):
        self.concepts = list(concepts)
        self.mix = mix
        self._p = mix.probabilities()
        clusters: dict[int, list[int]] = {}
        for i, c in enumerate(self.concepts):
            clusters.setdefault(c.cluster, []).append(i)
        self._neighbours = [[j for j in clusters[c.cluster] if j != i] for i, c in enumerate(self.concepts)]

    def caption(self, i: int, background: str, rng: np.random.Generator) -> str:
        """One caption for an image of concept ``i`` shown on ``background``."""
        concept = self.concepts[i]
        kind = int(rng.choice(4, p=self._p))
        if kind == 2:
            return self._attributes(concept, background, rng)
        named = self.concepts[self._noisy_index(i, rng)]
        if kind == 0:
            return NAME_TEMPLATES[int(rng.integers(len(NAME_TEMPLATES)))].format(named.name)
        if kind == 1:
            axes = self._some_axes(rng, at_least=1)
            phrase = attribute_phrase(concept, axes)
            forms = (f"a {named.name}, {article(phrase)} {phrase}.", f"{article(phrase)} {phrase} called a {named.name}.",
                     f"a picture of a {named.name}: {article(phrase)} {phrase}.",
                     f"{count_phrase(concept.count)} {plural(named.name) if concept.count != 'one' else named.name} "
                     f"on {background_phrase(background)}.")
            return forms[int(rng.integers(len(forms)))]
        sentences = describe(named, rng, n_informative=1, n_vague=0)
        return sentences[0]

    def _noisy_index(self, i: int, rng: np.random.Generator) -> int:
        if rng.random() >= self.mix.name_noise:
            return i
        options = self._neighbours[i] or [j for j in range(len(self.concepts)) if j != i]
        return int(options[int(rng.integers(len(options)))])

    @staticmethod
    def _some_axes(rng: np.random.Generator, at_least: int = 1) -> tuple[str, ...]:
        visual = ("size", "colour", "pattern", "shape")
        keep = rng.random(len(visual)) < 0.6
        if keep.sum() < at_least:
            keep[int(rng.integers(len(visual)))] = True
        return tuple(a for a, k in zip(visual, keep) if k)

    def _attributes(self, concept: Concept, background: str, rng: np.random.Generator) -> str:
        phrase = attribute_phrase(concept, self._some_axes(rng))
        if rng.random() < 0.5:
            n = concept.count
            head = f"{article(phrase)} {phrase}" if n == "one" else f"{count_phrase(n)} {plural(phrase)}"
        else:
            head = f"{article(phrase)} {phrase}"
        if rng.random() < 0.4:
            head += f" on {background_phrase(background)}"
        prefix = ("a photo of ", "", "an image of ")[int(rng.integers(3))]
        return prefix + head + "."


