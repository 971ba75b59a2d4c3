"""TextTower: the bridge must reproduce each model's own ``encode_text`` from token embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchoropt import TextTower, UnsupportedTowerError
from anchoropt.testing import tiny_custom_text_clip, tiny_open_clip, tiny_openai_clip

EOT = 49407  # CLIP BPE end-of-text id
# Different lengths on purpose: the longest decides the truncated run length.
SENTENCES = [
    "a photo of a dog.",
    "cat",
    "a blurry photo of a big red fire truck parked next to the old station.",
    "an origami chihuahua.",
]
EXPECTED_LAYOUT = {"open_clip": "open_clip", "custom_text": "open_clip_custom", "openai": "openai"}


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return tokenizer(SENTENCES)


def _eot_positions(ids: torch.Tensor) -> torch.Tensor:
    """End-of-text position of every row, found by id (independent of the tower's argmax)."""
    rows, cols = (ids == EOT).nonzero(as_tuple=True)
    assert rows.tolist() == list(range(ids.shape[0]))  # exactly one EOT per row
    return cols


def _reference(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(ids)


# ---------------------------------------------------------------- exactness against encode_text


@pytest.mark.parametrize(
    ("truncate", "bucket_min_prompts"), [(True, 256), (True, 1), (False, 256)], ids=["truncated", "bucketed", "full"]
)
def test_encode_text_equals_model(fp32_model, ids, truncate, bucket_min_prompts) -> None:
    tower = TextTower(fp32_model, truncate=truncate, bucket_min_prompts=bucket_min_prompts)
    eot = _eot_positions(ids)
    assert len(set(eot.tolist())) == len(SENTENCES)  # the batch really mixes lengths
    assert tower.can_truncate is truncate
    assert tower.run_length(eot) == (int(eot.max()) + 1 if truncate else 77)
    with torch.no_grad():
        out = tower.encode_text(ids)
    assert out.shape == (len(SENTENCES), tower.output_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(fp32_model, ids), atol=1e-5, rtol=1e-5)


def test_layout_detection_and_facts(fp32_model, request) -> None:
    name = request.node.callspec.params["fp32_model"]
    tower = TextTower.from_model(fp32_model)
    assert tower.layout == EXPECTED_LAYOUT[name]
    assert tower.sequence_first is (name == "openai")
    assert (tower.context_length, tower.width, tower.output_dim) == (77, 64, 32)  # the factories' defaults
    assert tower.dtype == torch.float32 and tower.causal and tower.pool_type == "argmax"
    assert TextTower.from_model(tower) is tower
    assert not isinstance(tower, nn.Module)  # owns no parameters: never lands in an optimizer or state_dict


def test_run_length_is_last_eot_plus_one(open_clip_model, ids) -> None:
    tower = TextTower(open_clip_model)
    eot = _eot_positions(ids)
    for k in range(1, len(SENTENCES) + 1):
        assert tower.run_length(eot[:k]) == int(eot[:k].max()) + 1
    torch.testing.assert_close(tower.pool_index(ids), eot)
    assert tower.run_length(eot[:0]) == 77  # nothing to pool: no shortcut


def test_single_prompt_batches_equal_joint_batch(open_clip_model, ids) -> None:
    """Truncating to a batch's length must not make a prompt depend on its batch mates."""
    tower = TextTower(open_clip_model)
    with torch.no_grad():
        joint = tower.encode_text(ids)
        alone = torch.cat([tower.encode_text(ids[i : i + 1]) for i in range(len(SENTENCES))])
    torch.testing.assert_close(alone, joint, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- reduced precision


def test_fp16_openai_tower(openai_fp16_model, openai_model, ids) -> None:
    tower = TextTower(openai_fp16_model)
    assert tower.dtype == torch.float16
    with torch.no_grad():
        out = tower.encode_text(ids)
        from_fp32_embeddings = tower.encode(tower.embed(ids).float(), tower.pool_index(ids))
    assert out.dtype == torch.float16 and from_fp32_embeddings.dtype == torch.float16
    torch.testing.assert_close(out, _reference(openai_fp16_model, ids), atol=1e-2, rtol=1e-2)
    # Same weights in fp32 (same seed): fp16 may only differ by rounding.
    torch.testing.assert_close(out.float(), _reference(openai_model, ids), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(from_fp32_embeddings, out)


def test_bf16_open_clip_tower(open_clip_model, ids) -> None:
    model = tiny_open_clip().requires_grad_(False).to(torch.bfloat16)
    tower = TextTower(model)
    assert tower.dtype == torch.bfloat16
    with torch.no_grad():
        out = tower.encode_text(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    reference = _reference(open_clip_model, ids)  # same seed, fp32
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    assert torch.cosine_similarity(out.float(), reference).min() > 0.999


# ---------------------------------------------------------------- towers where truncation is not exact


def test_siglip_like_tower_runs_full_length(siglip_like_model, ids) -> None:
    tower = TextTower(siglip_like_model)
    assert tower.pool_type == "last" and not tower.causal and tower.can_truncate is False
    eot = _eot_positions(ids)
    assert tower.run_length(eot) == 77
    with torch.no_grad():
        out = tower.encode_text(ids)
    torch.testing.assert_close(out, _reference(siglip_like_model, ids), atol=1e-5, rtol=1e-5)
    embeddings = tower.embed(ids)[:, : int(eot.max()) + 1]  # enough for a causal tower, not for this one
    with pytest.raises(ValueError, match=r"positions but this tower needs 77.*bidirectional"):
        tower.encode(embeddings, tower.pool_index(ids))


def test_non_causal_openai_tower_is_not_truncated(ids) -> None:
    model = tiny_openai_clip(fp16=False, causal=False).requires_grad_(False)
    tower = TextTower(model)
    assert not tower.causal and not tower.can_truncate
    with torch.no_grad():
        out = tower.encode_text(ids)
    torch.testing.assert_close(out, _reference(model, ids), atol=1e-5, rtol=1e-5)


def test_pad_masked_tower(ids) -> None:
    # Bidirectional, so that masking the padding keys changes what the real tokens see.
    model = tiny_custom_text_clip(no_causal_mask=True).requires_grad_(False)
    model.text.use_pad_mask = True  # open_clip masks padding keys when this is set
    tower = TextTower(model)
    assert tower.pad_mask_id == model.text.pad_id and tower.can_truncate is False
    with torch.no_grad():
        out = tower.encode_text(ids)
        plain = TextTower(tiny_custom_text_clip(no_causal_mask=True).requires_grad_(False)).encode_text(ids)
    torch.testing.assert_close(out, _reference(model, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)  # the pad mask really changes the result
    with pytest.raises(ValueError, match="masks padding tokens: pass the prompts' token_ids"):
        tower.encode(tower.embed(ids), tower.pool_index(ids))


@pytest.mark.parametrize(
    ("overrides", "expected_length"),
    [({"pool_type": "eos", "eos_id": EOT}, "eot"), ({"pool_type": "first"}, 1)],
    ids=["eos", "first"],
)
def test_other_pool_types(ids, overrides, expected_length) -> None:
    model = tiny_custom_text_clip(**overrides).requires_grad_(False)
    tower = TextTower(model)
    eot = _eot_positions(ids)
    pool = tower.pool_index(ids)
    if expected_length == "eot":
        torch.testing.assert_close(pool, eot)
        assert tower.run_length(pool) == int(eot.max()) + 1
    else:
        assert pool.tolist() == [0] * len(SENTENCES) and tower.run_length(pool) == 1
    with torch.no_grad():
        out = tower.encode_text(ids)
    torch.testing.assert_close(out, _reference(model, ids), atol=1e-5, rtol=1e-5)


def test_eos_pooling_without_eos_token_is_refused(ids) -> None:
    tower = TextTower(tiny_custom_text_clip(pool_type="eos", eos_id=EOT))
    cut = ids.clone()
    cut[cut == EOT] = 0
    with pytest.raises(ValueError, match=r"no end-of-text token \(id 49407\).*truncated"):
        tower.pool_index(cut)


# ---------------------------------------------------------------- gradients


def test_encode_gives_gradients_wrt_embeddings(fp32_model, ids) -> None:
    tower = TextTower(fp32_model)
    eot = _eot_positions(ids)
    emb = tower.embed(ids).clone().requires_grad_(True)  # full 77 positions
    feats = tower.encode(emb, eot)
    (grad,) = torch.autograd.grad(feats.pow(2).sum(), emb)
    for i, e in enumerate(eot.tolist()):
        assert grad[i, : e + 1].abs().amax(dim=-1).gt(0).all(), f"prompt {i}: a position before its EOT got no gradient"
        assert grad[i, e + 1 :].abs().max() == 0, f"prompt {i}: positions after its EOT influence its feature"


def test_encode_gradcheck_float64(ids) -> None:
    model = tiny_open_clip(width=16, heads=2, layers=1, embed_dim=8).double().requires_grad_(False)
    tower = TextTower(model)
    short = ids[:2]  # "a photo of a dog." and "cat"
    pool = tower.pool_index(short)
    emb = tower.embed(short)[:, : tower.run_length(pool)].clone().requires_grad_(True)
    assert emb.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda e: tower.encode(e, pool), (emb,), eps=1e-6, atol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- OpenAI layout: per-block masks


def test_openai_block_masks_restored(openai_model, ids) -> None:
    tower = TextTower(openai_model)
    originals = [block.attn_mask for block in tower.blocks]
    seen: list[tuple[int, ...]] = []
    handle = tower.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(tuple(block.attn_mask.shape)))
    try:
        with torch.no_grad():
            tower.encode_text(ids)
    finally:
        handle.remove()
    length = tower.run_length(_eot_positions(ids))
    assert seen == [(length, length)]  # the blocks really ran with a truncated mask ...
    assert all(block.attn_mask is mask for block, mask in zip(tower.blocks, originals))  # ... and got theirs back


def test_openai_block_masks_restored_after_exception(openai_model, ids) -> None:
    tower = TextTower(openai_model)
    originals = [block.attn_mask for block in tower.blocks]

    def boom(block, args):
        raise RuntimeError("boom inside the transformer")

    handle = tower.blocks[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside the transformer"):
            tower.encode_text(ids)
    finally:
        handle.remove()
    assert all(block.attn_mask is mask for block, mask in zip(tower.blocks, originals))
    assert originals[0].shape == (77, 77)
    with torch.no_grad():  # and the model itself still works
        torch.testing.assert_close(openai_model.encode_text(ids), tower.encode_text(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input


def test_wrong_width_embeddings(open_clip_model, ids) -> None:
    tower = TextTower(open_clip_model)
    pool = tower.pool_index(ids)
    with pytest.raises(ValueError, match=r"shape \(C, L, 64\), got \(4, 77, 48\)"):
        tower.encode(torch.zeros(4, 77, 48), pool)
    with pytest.raises(ValueError, match=r"shape \(C, L, 64\), got \(77, 64\)"):
        tower.encode(torch.zeros(77, 64), pool)


def test_wrong_pool_index_shape(open_clip_model, ids) -> None:
    tower = TextTower(open_clip_model)
    emb = tower.embed(ids)
    with pytest.raises(ValueError, match=r"pool_index must have shape \(4,\), got \(3,\)"):
        tower.encode(emb, tower.pool_index(ids)[:3])
    with pytest.raises(ValueError, match=r"pool_index must have shape \(4,\), got \(4, 1\)"):
        tower.encode(emb, tower.pool_index(ids)[:, None])


def test_embeddings_shorter_than_pooled_position(open_clip_model, ids) -> None:
    tower = TextTower(open_clip_model)
    pool = tower.pool_index(ids)
    need = int(pool.max()) + 1
    with pytest.raises(ValueError, match=rf"have {need - 1} positions but this tower needs {need}"):
        tower.encode(tower.embed(ids)[:, : need - 1], pool)


def test_not_a_clip_model() -> None:
    with pytest.raises(
        UnsupportedTowerError,
        match="Linear is not a CLIP model .*missing token_embedding, positional_embedding, transformer, "
        "ln_final, text_projection",
    ):
        TextTower(nn.Linear(4, 4))

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = nn.Embedding(10, 4)
            self.transformer = nn.Identity()

    with pytest.raises(UnsupportedTowerError, match=r"missing positional_embedding, ln_final, text_projection$"):
        TextTower(Partial())
    assert issubclass(UnsupportedTowerError, TypeError)


def test_coca_style_tower_refused() -> None:
    model = tiny_custom_text_clip(embed_cls=True)
    assert model.text.cls_emb is not None
    with pytest.raises(UnsupportedTowerError, match=r"CLS embedding \(CoCa-style, embed_cls=True\)"):
        TextTower(model)


def test_text_tower_without_token_embedding_refused() -> None:
    class HFLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = nn.Linear(2, 2)

    with pytest.raises(UnsupportedTowerError, match=r"HFLike.text is a Linear without a token_embedding"):
        TextTower(HFLike())


def test_unknown_pool_type_refused() -> None:
    model = tiny_custom_text_clip()
    model.text.pool_type = "mean"
    with pytest.raises(UnsupportedTowerError, match=r"text pool type 'mean' is not supported"):
        TextTower(model)
