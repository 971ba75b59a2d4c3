"""Exact speed shortcuts of the bridge: shared prefix and length bucketing vs the plain full-length pass."""

from __future__ import annotations

import pytest
import torch

from anchoropt import AnchorPromptTemplate, TextTower, shared_prefix
from anchoropt.testing import tiny_custom_text_clip, tiny_open_clip, tiny_openai_clip

CLASSES = ["cat", "golden retriever", "sea turtle", "dog", "red-eyed tree frog", "fire truck", "a b c d e f g"]

TOWERS = {
    "open_clip": lambda: tiny_open_clip(),
    "custom_text": lambda: tiny_custom_text_clip(),
    "openai": lambda: tiny_openai_clip(fp16=False),
    "layer_scale": lambda: tiny_open_clip(ls_init_value=0.5),
}


def _plain(model) -> TextTower:
    return TextTower(model, truncate=False, share_prefix=False)


def _plain_features(model, slots: torch.Tensor, n_soft: int, n_anchor: int, kind: str = "normal") -> torch.Tensor:
    """Reference: the full 77-token pass of the filled prompts, no shortcut."""
    template = AnchorPromptTemplate(_plain(model), CLASSES, n_soft=n_soft, n_anchor=n_anchor)
    layout = getattr(template, kind)
    return template.tower.encode(template.fill(layout, slots), layout.pool_index, layout.token_ids)


def _features_and_grad(tower: TextTower, template: AnchorPromptTemplate, slots: torch.Tensor, shared: bool):
    slots = slots.clone().requires_grad_(True)
    layout = template.normal
    if shared:
        features = template.encode_slots(layout, slots)
    else:
        features = tower.encode(template.fill(layout, slots), layout.pool_index, layout.token_ids)
    (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
    return features.detach(), slots.grad


@pytest.mark.parametrize("name", list(TOWERS))
def test_shared_prefix_equals_full_length_pass(name):
    model = TOWERS[name]()
    fast = TextTower(model)
    template = AnchorPromptTemplate(fast, CLASSES, n_soft=4, n_anchor=1)
    slots = torch.randn(5, fast.width) * 0.05
    assert fast.can_share_prefix(1 + 5, template.normal.pool_index)
    got, got_grad = _features_and_grad(fast, template, slots, shared=True)
    plain = _plain(model)
    plain_template = AnchorPromptTemplate(plain, CLASSES, n_soft=4, n_anchor=1)
    want, want_grad = _features_and_grad(plain, plain_template, slots, shared=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-3)


def test_the_shortcut_is_really_taken(monkeypatch):
    tower = TextTower(tiny_open_clip())
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=2, n_anchor=1)
    calls = []
    original = shared_prefix.encode_with_shared_prefix
    monkeypatch.setattr(shared_prefix, "encode_with_shared_prefix", lambda *a, **k: calls.append(1) or original(*a, **k))
    template.encode_slots(template.normal, torch.randn(3, tower.width))
    assert calls == [1]


def test_grouped_prefixes_one_per_image_match_separate_passes():
    """CoCoOp-style: a different prefix per image, the same class suffixes."""
    model = tiny_open_clip()
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=3, n_anchor=1)
    slots = torch.randn(3, 4, tower.width) * 0.05
    grouped = template.encode_slots(template.normal, slots)
    assert grouped.shape == (3, len(CLASSES), 32)
    for g in range(3):
        want = _plain_features(model, slots[g], 3, 1)
        torch.testing.assert_close(grouped[g], want, atol=1e-5, rtol=1e-4)


def test_without_bucketing_same_result():
    model = tiny_open_clip()
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=4, n_anchor=1)
    slots = torch.randn(1, 5, tower.width)
    emb = template.normal.embeddings
    prefix = torch.cat([emb[:1, :1], slots], dim=1)
    args = (tower, prefix, emb[:, 6:], template.normal.pool_index)
    torch.testing.assert_close(
        shared_prefix.encode_with_shared_prefix(*args, bucket=True),
        shared_prefix.encode_with_shared_prefix(*args, bucket=False),
        atol=1e-5, rtol=1e-4,
    )


def test_bucketed_module_path_equals_one_length_path():
    model = tiny_open_clip()
    bucketed = TextTower(model, share_prefix=False, bucket_min_prompts=1)
    template = AnchorPromptTemplate(bucketed, CLASSES, n_soft=4, n_anchor=1)
    embeddings = template.fill(template.normal, torch.randn(5, bucketed.width))
    embeddings.requires_grad_(True)
    got = bucketed.encode(embeddings, template.normal.pool_index)
    (got_grad,) = torch.autograd.grad(got.sum(), embeddings)
    want = TextTower(model, share_prefix=False).encode(embeddings, template.normal.pool_index)
    (want_grad,) = torch.autograd.grad(want.sum(), embeddings)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-3)


def test_fp16_openai_tower_close_to_full_pass():
    model = tiny_openai_clip(fp16=True)
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=4, n_anchor=1)
    slots = torch.randn(5, tower.width) * 0.05
    got = template.encode_slots(template.normal, slots)
    assert got.dtype == torch.float16
    want = _plain_features(model, slots, 4, 1)
    torch.testing.assert_close(got.float(), want.float(), atol=5e-3, rtol=5e-3)


def _forbid_shortcut(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the shared-prefix shortcut must not be used here")

    monkeypatch.setattr(shared_prefix, "encode_with_shared_prefix", refuse)


def test_falls_back_for_bidirectional_towers(monkeypatch):
    model = tiny_custom_text_clip(no_causal_mask=True, pool_type="last")
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=2, n_anchor=1)
    _forbid_shortcut(monkeypatch)
    slots = torch.randn(3, tower.width)
    got = template.encode_slots(template.normal, slots)
    want = tower.encode(template.fill(template.normal, slots), template.normal.pool_index, template.normal.token_ids)
    torch.testing.assert_close(got, want)


def test_falls_back_when_blocks_are_hooked_or_checkpointed(monkeypatch):
    model = tiny_open_clip()
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=2, n_anchor=1)
    slots = torch.randn(3, tower.width)
    expected = template.encode_slots(template.normal, slots)
    _forbid_shortcut(monkeypatch)
    handle = tower.blocks[1].register_forward_pre_hook(lambda module, args: None)
    try:
        torch.testing.assert_close(template.encode_slots(template.normal, slots), expected, atol=1e-5, rtol=1e-4)
    finally:
        handle.remove()
    model.set_grad_checkpointing(True)
    try:
        torch.testing.assert_close(template.encode_slots(template.normal, slots), expected, atol=1e-5, rtol=1e-4)
    finally:
        model.set_grad_checkpointing(False)


def test_falls_back_for_unknown_block_types(monkeypatch):
    model = tiny_open_clip(qk_norm=True)  # open_clip's CustomResidualAttentionBlock
    tower = TextTower(model)
    assert not shared_prefix.supports(tower.blocks)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=2, n_anchor=1)
    _forbid_shortcut(monkeypatch)
    slots = torch.randn(3, tower.width)
    want = _plain_features(model, slots, 2, 1)
    torch.testing.assert_close(template.encode_slots(template.normal, slots), want, atol=1e-5, rtol=1e-4)


def test_anchor_prompt_uses_the_shortcut_exactly():
    model = tiny_openai_clip(fp16=False)
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=0, n_anchor=2)
    anchors = torch.randn(2, tower.width) * 0.05
    got = template.encode_slots(template.anchor, anchors)
    want = _plain_features(model, anchors, 0, 2, kind="anchor")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bf16_tower_close_to_full_pass_with_gradients():
    model = tiny_open_clip().to(torch.bfloat16)
    tower = TextTower(model)
    template = AnchorPromptTemplate(tower, CLASSES, n_soft=4, n_anchor=1)
    slots = (torch.randn(5, tower.width) * 0.05).requires_grad_(True)
    got = template.encode_slots(template.normal, slots)
    assert got.dtype == torch.bfloat16
    (got_grad,) = torch.autograd.grad(got.float().sum(), slots)
    reference_slots = slots.detach().clone().requires_grad_(True)
    want = _plain_features(model, reference_slots, 4, 1)
    (want_grad,) = torch.autograd.grad(want.float().sum(), reference_slots)
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    assert torch.nn.functional.cosine_similarity(got_grad.flatten(), want_grad.flatten(), dim=0) > 0.99
