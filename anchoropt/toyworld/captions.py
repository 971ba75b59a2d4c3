"""Pretraining captions: the text side of the toy world's image-text pairs.

A caption of an image of concept ``c`` (on background ``bg``) is one of four kinds, drawn with fixed
probabilities (:class:`CaptionMix`):

* ``name``       - the class name in a template: ``"a picture of a vina."``, ``"my vina."`` ...
* ``name_attr``  - the name together with (some of) its attributes: ``"a vina, a small purple circle."``
* ``attr``       - attributes only, any subset, with count and background: ``"two red striped squares on
  a dark background."``
* ``fact``       - a description-style sentence about the class (:func:`descriptions.describe` wording).

Styles: an image is drawn in a style (:data:`render.SEEN_DOMAINS`), and with probability ``style_mention`` its
caption says so (``"a sketch of a vina."``, ``"a blurry photo of two red circles."``): the words of a prompt's
context are tied to how images look, so a context that names the wrong style costs accuracy and a learned one
can find the right style (the caption-to-task gap CoOp closes on real CLIP).

Name frequency: class names are Zipf-distributed, as words on the web are: the class of frequency rank ``r``
(a fixed shuffle of the world) keeps its name in a caption with probability ``(1 + r / name_zipf_offset) **
-name_zipf``, otherwise the caption describes it by attributes alone.  Rare names are weakly bound;
attributes, seen in every caption kind, stay well bound - so descriptions carry what rare names lack.

Every class's name is used, as real CLIP has seen the names of the "novel" classes of a benchmark.
Attributes-only captions keep each visual axis with probability ``attr_keep`` (at least ``attr_at_least`` of
them): specific captions bind attributes well and leave fewer in-batch false negatives, so the learned
temperature can rise.  Binding noise: with probability ``name_noise`` a caption's name is replaced by the name of a fine-grained
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

__all__ = ["CaptionMix", "Captioner", "NAME_TEMPLATES", "STYLE_PHRASES", "name_keep_probability"]

NAME_TEMPLATES = (
    "a {}.", "{}", "a picture of a {}.", "an image of the {}.", "this is a {}.", "my {}.",
    "a close-up of a {}.", "look at this {}!", "the {} in a picture.", "a good picture of a {}.",
)
"""Name-only caption templates.  The zero-shot hand prompt ``"a photo of a {}."`` is deliberately not one of
them (its words do occur in other captions): a hand prompt is a guess at how captions look, as with real
CLIP, which leaves a learned context (CoOp and its family) something to find."""


STYLE_PHRASES = {
    "photo": ("a picture of", "an image of", "a snapshot of", "a nice picture of"),
    "sketch": ("a sketch of", "a drawing of", "a pencil sketch of"),
    "blurry": ("a blurry photo of", "a blurred picture of", "an out of focus photo of"),
    "dark": ("a dark photo of", "a picture taken at night of", "a dim photo of"),
    "painting": ("a painting of", "an oil painting of", "a painted picture of"),
    "texture": ("the texture of", "a close-up of the surface of", "a swatch of the texture of"),
    "scene": ("a scene with", "a wide shot of a scene with", "a cluttered scene with"),
}
"""How captions name an image's style.  ``"a photo of"`` is not among the photo phrases: the word ``photo``
occurs with the blurry and dark styles, so the hand prompt ``"a photo of a {}."`` is a fair guess, not the
pretraining captions' own wording."""


@dataclass(frozen=True)
class CaptionMix:
    """Probabilities of the caption kinds (normalised), of binding noise, of naming the style, and the Zipf law
    of name frequencies (``name_zipf = 0``: every name used every time)."""

    name: float = 0.4
    name_attr: float = 0.2
    attr: float = 0.3
    fact: float = 0.1
    name_noise: float = 0.1
    style_mention: float = 0.0
    name_zipf: float = 0.0
    name_zipf_offset: float = 30.0
    attr_keep: float = 0.6
    attr_at_least: int = 0

    def probabilities(self) -> np.ndarray:
        p = np.array([self.name, self.name_attr, self.attr, self.fact], dtype=np.float64)
        if (p < 0).any() or p.sum() <= 0 or not 0 <= self.name_noise <= 1:
            raise ValueError(f"caption probabilities must be >= 0 with a positive sum, name_noise in [0, 1]: {self}")
        if not 0 <= self.style_mention <= 1 or self.name_zipf < 0 or not self.name_zipf_offset > 0:
            raise ValueError(f"style_mention must be in [0, 1], name_zipf >= 0 and name_zipf_offset > 0: {self}")
        return p / p.sum()


def name_keep_probability(concepts: Sequence[Concept], mix: CaptionMix) -> np.ndarray:
    """``(C,)``: the probability that a caption of each concept uses its name (the Zipf law of name
    frequencies over the whole world; a concept's rank is fixed by the world, not by ``concepts``)."""
    from .concepts import frequency_rank

    ranks = np.array([frequency_rank(c) for c in concepts], dtype=np.float64)
    return (1.0 + ranks / mix.name_zipf_offset) ** (-mix.name_zipf)


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
        self._keep_name = name_keep_probability(self.concepts, mix)

    def caption(self, i: int, background: str, rng: np.random.Generator, style: str = "photo") -> str:
        """One caption for an image of concept ``i`` shown on ``background`` in ``style``."""
        concept = self.concepts[i]
        kind = int(rng.choice(4, p=self._p))
        phrase = None
        if rng.random() < self.mix.style_mention:
            options = STYLE_PHRASES[style]
            phrase = options[int(rng.integers(len(options)))]
        if kind == 2 or rng.random() >= self._keep_name[i]:
            return self._attributes(concept, background, rng, phrase, style)
        named = self.concepts[self._noisy_index(i, rng)]
        if phrase is not None and kind in (0, 1):
            return self._styled(phrase, named.name, concept, kind, rng)
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

    def _some_axes(self, rng: np.random.Generator, at_least: int = 1) -> tuple[str, ...]:
        """Some of the visual axes, each kept with probability ``mix.attr_keep``, at least ``at_least``."""
        visual = ("size", "colour", "pattern", "shape")
        keep = rng.random(len(visual)) < self.mix.attr_keep
        while keep.sum() < at_least:
            keep[int(rng.integers(len(visual)))] = True
        return tuple(a for a, k in zip(visual, keep) if k)

    def _styled(self, phrase: str, name: str, concept: Concept, kind: int, rng: np.random.Generator) -> str:
        """A name (``kind`` 0) or name-and-attributes (``kind`` 1) caption that names the style."""
        if kind == 0:
            return f"{phrase} {article(name)} {name}."
        axes = self._some_axes(rng, at_least=1)
        if phrase in STYLE_PHRASES["texture"]:
            axes = tuple(a for a in axes if a in ("colour", "pattern")) or ("colour",)
        attrs = attribute_phrase(concept, axes)
        return f"{phrase} {article(name)} {name}, {article(attrs)} {attrs}."

    def _attributes(self, concept: Concept, background: str, rng: np.random.Generator,
                    style_phrase: str | None = None, style: str = "photo") -> str:
        """An attributes-only caption (a close-up names colour and pattern only: it shows no outline)."""
        axes = self._some_axes(rng, at_least=self.mix.attr_at_least)
        if style == "texture":
            axes = tuple(a for a in axes if a in ("colour", "pattern")) or ("colour",)
        phrase = attribute_phrase(concept, axes)
        if style != "texture" and rng.random() < 0.5:
            n = concept.count
            head = f"{article(phrase)} {phrase}" if n == "one" else f"{count_phrase(n)} {plural(phrase)}"
        else:
            head = f"{article(phrase)} {phrase}"
        if rng.random() < 0.4:
            head += f" on {background_phrase(background)}"
        if style_phrase is not None:
            return f"{style_phrase} {head}."
        prefix = ("a photo of ", "", "an image of ")[int(rng.integers(3))]
        return prefix + head + "."


