"""The toy world: procedurally rendered image-text data and a small CLIP pretrained on it.

A world in which accuracy means something offline: concepts with invented names bound to attribute
bundles (:mod:`.concepts`), rendered into 32 x 32 images (:mod:`.render`), described in the CuPL format
(:mod:`.descriptions`), written as an ordinary dataset directory (:func:`make`), and a small open_clip
``CLIP`` pretrained on the world's captions, shipped with the package (:func:`load_model`).
See ``docs/toyworld.md``.
"""

from .model import load_model

__all__ = ["load_model"]
