"""MPA: spectral masks, filtering, ranking by a task loss, energy-weighted pooling, propagation to deeper layers."""

from __future__ import annotations

import pytest
import torch

from anchoropt.methods import mpa
from anchoropt.testing import tiny_open_clip

H = 32


@pytest.fixture(scope="module")
def visual():
    return tiny_open_clip(image_size=H, vision_layers=3).requires_grad_(False).eval().visual


def test_mask_counts_follow_window_and_stride():
    assert mpa.spectral_masks(224).shape == (729, 224, 224)  # PAE: window 16, stride 8 at 224 px
    assert mpa.spectral_masks(448).shape[0] == 729  # scaled with the image size
    masks = mpa.spectral_masks(H, window=4, stride=4)
    assert masks.shape == (64, H, H) and masks.sum(dim=(1, 2)).eq(16).all()
    assert masks.sum(dim=0).eq(1).all()  # stride == window: a tiling
    with pytest.raises(ValueError, match="window"):
        mpa.spectral_masks(H, window=H + 1)
    with pytest.raises(ValueError, match="height"):
        mpa.spectral_masks(0)


def test_filter_is_exact_and_linear_over_a_tiling():
    images = torch.randn(2, 3, H, H, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mpa.spectral_filter(images, torch.ones(H, H, dtype=torch.bool)), images,
                               atol=1e-5, rtol=0)
    masks = mpa.spectral_masks(H, window=8, stride=8)
    parts = torch.stack([mpa.spectral_filter(images, m) for m in masks]).sum(dim=0)
    torch.testing.assert_close(parts, images, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="mask"):
        mpa.spectral_filter(images, torch.ones(H, H + 1))


def _band_batch(n=16, freq=5, seed=0):
    """Label = sign of a horizontal cosine at ``freq`` cycles, buried in strong white noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.arange(H, dtype=torch.float32)
    pattern = torch.cos(2 * torch.pi * freq * x / H)[None, :].expand(H, H)
    sign = (1 - 2 * labels.float())[:, None, None, None]
    images = sign * pattern + 3.0 * torch.randn(n, 3, H, H, generator=g)
    return images, labels, pattern


def test_mpa_picks_masks_in_the_label_carrying_band(visual):
    images, labels, pattern = _band_batch()
    pattern = pattern / pattern.norm()

    def classify(batch):  # a linear probe that reads the label band
        score = 50 * (batch.mean(dim=1) * pattern).sum(dim=(1, 2))
        return torch.stack([score, -score], dim=1)

    result = mpa.mpa_init(visual, images, labels, n_prompts=2, classifier=classify, window=4, stride=4)
    masks, losses, chosen = result.masks, result.losses, result.mask_index
    centre = H // 2  # fftshift puts frequency 0 at H // 2: the band sits at columns centre +- 5, row centre
    in_band = masks[:, centre, centre + 5] | masks[:, centre, centre - 5]
    assert in_band[chosen].all() and in_band.sum() == 2
    assert losses[~in_band].min() > losses[in_band].max()


def test_energy_pool_matches_a_loop():
    tokens = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    total = sum(float(tokens[b, p].pow(2).sum()) for b in range(3) for p in range(5))
    expected = sum(tokens[b, p] * float(tokens[b, p].pow(2).sum()) / total for b in range(3) for p in range(5))
    torch.testing.assert_close(mpa.energy_pool(tokens), expected)


def test_patch_embeddings_are_the_first_blocks_inputs_without_the_class_token(visual):
    images = torch.randn(2, 3, H, H)
    seen = {}
    handle = visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    visual(images)
    handle.remove()
    torch.testing.assert_close(mpa.patch_embeddings(visual, images), seen["x"][:, 1:])


def test_mpa_init_on_a_clip_tower(visual):
    images, labels, _ = _band_batch(n=8)
    text = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    result = mpa.mpa_init(visual, images, labels, n_prompts=3, depth=2, text_features=text, window=8, stride=4)
    assert result.prompts.shape == (3, 3, 64) and result.first.shape == (3, 64) and result.deep.shape == (2, 3, 64)
    assert result.masks.shape[0] == result.losses.shape[0] == 49
    assert torch.equal(result.mask_index, torch.topk(result.losses, 3, largest=False).indices)
    expected = mpa.energy_pool(mpa.patch_embeddings(visual, mpa.spectral_filter(images, result.masks[result.mask_index[0]])))
    torch.testing.assert_close(result.first[0], expected)
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        torch.testing.assert_close(result.deep[0], blocks[0](result.first[None])[0])
        torch.testing.assert_close(result.deep[1], blocks[1](result.deep[0][None])[0])
    released = mpa.mpa_init(visual, images, labels, 3, classifier=mpa.random_head_classifier(visual, 2), window=8,
                            stride=4)
    assert released.prompts.shape == (1, 3, 64) and torch.isfinite(released.losses).all()


def test_zero_shot_text_features_are_the_models():
    model = tiny_open_clip(image_size=H).requires_grad_(False).eval()
    from anchoropt.template import default_tokenizer

    features = mpa.zero_shot_text_features(model, ["red_fox", "cat"])
    expected = model.encode_text(default_tokenizer()(["a photo of a red fox.", "a photo of a cat."]))
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="class name"):
        mpa.zero_shot_text_features(model, [])


def test_mpa_init_bad_input(visual):
    images, labels, _ = _band_batch(n=4)
    with pytest.raises(ValueError, match="text_features"):
        mpa.mpa_init(visual, images, labels, 2)
    with pytest.raises(ValueError, match="depth"):
        mpa.mpa_init(visual, images, labels, 2, depth=3, text_features=torch.randn(2, 32))
    with pytest.raises(ValueError, match="masks"):
        mpa.mpa_init(visual, images, labels, 50, text_features=torch.randn(2, 32), window=8, stride=4)
    with pytest.raises(ValueError, match="n_prompts"):
        mpa.mpa_init(visual, images, labels, 0, text_features=torch.randn(2, 32))
    with pytest.raises(TypeError, match="ViT"):
        mpa.patch_embeddings(torch.nn.Linear(2, 2), images)
