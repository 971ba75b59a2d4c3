"""AnchorPromptTemplate: filled with real words' embeddings, a prompt must encode like the real sentence."""

from __future__ import annotations

import re

import pytest
import torch

from anchoropt import AnchorPromptTemplate, TextTower

EOT = 49407
# Single- and multi-token names (axolotl is one word of 4 BPE tokens), one with underscores.
CLASSNAMES = ["dog", "axolotl", "fire_truck", "great white shark", "Yorkshire terrier"]
READABLE = [c.replace("_", " ") for c in CLASSNAMES]


def _word_embeddings(tower: TextTower, tokenizer, words: str, n: int) -> torch.Tensor:
    """Token embeddings ``(n, D)`` (fp32) of ``words``, which must be exactly ``n`` BPE tokens."""
    ids = tokenizer([words])[0]
    assert ids[n + 1] == EOT, f"{words!r} is not {n} tokens"
    return tower.token_embedding.weight[ids[1 : n + 1]].detach().float()


def _encode_text(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer(sentences))


@pytest.fixture(scope="module")
def template(open_clip_model, tokenizer) -> AnchorPromptTemplate:
    return AnchorPromptTemplate(open_clip_model, CLASSNAMES, n_soft=4, n_anchor=1, tokenizer=tokenizer)


def test_some_class_names_are_multi_token(tokenizer) -> None:
    lengths = [len(tokenizer.encode(name)) for name in READABLE]
    assert min(lengths) == 1 and max(lengths) >= 3


# ---------------------------------------------------------------- equivalence with real sentences


def test_normal_prompt_with_real_words_equals_encode_text(fp32_model, tokenizer) -> None:
    tpl = AnchorPromptTemplate(fp32_model, CLASSNAMES, n_soft=3, n_anchor=1, tokenizer=tokenizer)
    words = _word_embeddings(tpl.tower, tokenizer, "a photo of a", 4)
    with torch.no_grad():
        feats = tpl.encode(tpl.normal, tpl.normal_prompts(words))
    expected = _encode_text(fp32_model, tokenizer, [f"a photo of a {c}." for c in READABLE])
    assert feats.shape == expected.shape == (len(CLASSNAMES), tpl.tower.output_dim)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n_anchor", "words", "preposition", "joiner"),
    [
        (1, "photo", "of", " of "),
        (2, "a photo", "of", " of "),
        (1, "photo", None, " "),
        (1, "photo", "", " "),
        (1, "photo", "  in the ", " in the "),
    ],
    ids=["of", "two-anchors", "none", "empty", "multi-word"],
)
def test_anchor_prompt_with_real_word_equals_encode_text(
    fp32_model, tokenizer, n_anchor, words, preposition, joiner
) -> None:
    tpl = AnchorPromptTemplate(
        fp32_model, CLASSNAMES, n_soft=2, n_anchor=n_anchor, preposition=preposition, tokenizer=tokenizer
    )
    anchors = _word_embeddings(tpl.tower, tokenizer, words, n_anchor)
    with torch.no_grad():
        feats = tpl.encode(tpl.anchor, tpl.anchor_prompts(anchors))
    expected = _encode_text(fp32_model, tokenizer, [f"{words}{joiner}{c}." for c in READABLE])
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


def test_fp16_openai_template(openai_fp16_model, tokenizer) -> None:
    tpl = AnchorPromptTemplate(openai_fp16_model, CLASSNAMES, n_soft=3, n_anchor=1, tokenizer=tokenizer)
    assert tpl.normal.embeddings.dtype == torch.float16
    words = _word_embeddings(tpl.tower, tokenizer, "a photo of a", 4)  # fp32 slots, cast at use
    with torch.no_grad():
        feats = tpl.encode(tpl.normal, tpl.normal_prompts(words))
    assert feats.dtype == torch.float16
    expected = _encode_text(openai_fp16_model, tokenizer, [f"a photo of a {c}." for c in READABLE])
    torch.testing.assert_close(feats, expected, atol=1e-2, rtol=1e-2)


def test_siglip_like_template_equals_encode_text(siglip_like_model, tokenizer) -> None:
    tpl = AnchorPromptTemplate(siglip_like_model, CLASSNAMES, n_soft=3, n_anchor=1, tokenizer=tokenizer)
    assert tpl.normal.token_ids.shape[1] == 77 and tpl.normal.pool_index.tolist() == [76] * len(CLASSNAMES)
    words = _word_embeddings(tpl.tower, tokenizer, "a photo of a", 4)
    with torch.no_grad():
        feats = tpl.encode(tpl.normal, tpl.normal_prompts(words))
    expected = _encode_text(siglip_like_model, tokenizer, [f"a photo of a {c}." for c in READABLE])
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- layout facts


def test_pool_index_is_true_eot_not_the_period(template, tokenizer) -> None:
    real = tokenizer([f"a b c d e {c}." for c in READABLE])  # same token count as the 5-slot normal prompt
    eot = (real == EOT).int().argmax(dim=1)
    period = (real == tokenizer.encode(".")[0]).int().argmax(dim=1)
    assert torch.equal(period + 1, eot)
    assert torch.equal(template.normal.pool_index, eot)
    assert torch.equal(template.normal.pool_index, real.argmax(dim=1))
    assert (template.normal.pool_index != period).all()
    # Stored rows are cut to the batch's run length, which ends at the longest prompt's EOT.
    assert template.normal.token_ids.shape[1] == int(eot.max()) + 1
    rows = torch.arange(len(CLASSNAMES))
    assert (template.normal.token_ids[rows, template.normal.pool_index] == EOT).all()

    anchor_real = tokenizer([f"a of {c}." for c in READABLE])
    assert torch.equal(template.anchor.pool_index, (anchor_real == EOT).int().argmax(dim=1))


def test_slots_and_underscores(template) -> None:
    assert template.classnames == READABLE  # underscores read as spaces
    assert (template.n_classes, template.n_soft, template.n_anchor) == (5, 4, 1)
    assert (template.normal.slot_start, template.normal.n_slots) == (1, 5)
    assert (template.anchor.slot_start, template.anchor.n_slots) == (1, 1)
    assert template.texts("normal")[2] == "X X X X X fire truck."
    assert template.texts("anchor")[2] == "X of fire truck."


def test_fill_puts_slots_between_frozen_rows(template) -> None:
    slots = torch.randn(5, 64)
    out = template.normal_prompts(slots)
    emb = template.normal.embeddings
    assert out.shape == emb.shape
    torch.testing.assert_close(out[:, 1:6], slots.expand(len(CLASSNAMES), 5, 64))
    torch.testing.assert_close(out[:, :1], emb[:, :1])
    torch.testing.assert_close(out[:, 6:], emb[:, 6:])


def test_batched_slots(template) -> None:
    slots = torch.randn(3, 5, 64)
    out = template.normal_prompts(slots)
    assert out.shape == (3, *template.normal.embeddings.shape)
    for b in range(3):
        torch.testing.assert_close(out[b], template.normal_prompts(slots[b]))
    anchors = torch.randn(2, 4, 1, 64)  # any number of leading axes
    assert template.anchor_prompts(anchors).shape == (2, 4, *template.anchor.embeddings.shape)


def test_gradients_reach_slots(template) -> None:
    slots = torch.randn(5, 64, requires_grad=True)
    feats = template.encode(template.normal, template.normal_prompts(slots))
    (grad,) = torch.autograd.grad(feats.pow(2).sum(), slots)
    assert grad.abs().amax(dim=1).gt(0).all()


def test_buffers_follow_dtype_and_device(open_clip_model, tokenizer, template) -> None:
    tpl = AnchorPromptTemplate(open_clip_model, CLASSNAMES, n_soft=4, tokenizer=tokenizer).to(torch.float64)
    assert tpl.normal.embeddings.dtype == tpl.anchor.embeddings.dtype == torch.float64
    assert tpl.normal.token_ids.dtype == tpl.normal.pool_index.dtype == torch.int64  # integer buffers untouched
    slots = torch.randn(5, 64)
    prompts = tpl.normal_prompts(slots)
    assert prompts.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(
            tpl.encode(tpl.normal, prompts), template.encode(template.normal, template.normal_prompts(slots)),
            atol=1e-5, rtol=1e-5,
        )
    tpl.to("meta")
    assert {b.device.type for b in tpl.buffers()} == {"meta"} and len(list(tpl.buffers())) == 6
    assert tpl.normal.embeddings.device.type == tpl.anchor.pool_index.device.type == "meta"


def test_state_dict_is_empty(template) -> None:
    assert template.state_dict() == {}
    assert list(template.parameters()) == []
    assert len(list(template.buffers())) == 6  # they exist, they are just not saved


# ---------------------------------------------------------------- class names that do not fit


def test_class_name_at_the_context_limit(open_clip_model, tokenizer) -> None:
    assert tokenizer.encode("dog dog dog") == tokenizer.encode("dog") * 3  # one token per word
    # normal prompt: SOS + 5 slots + k + "." + EOT = k + 8 tokens <= 77
    fits = " ".join(["dog"] * 69)
    tpl = AnchorPromptTemplate(open_clip_model, [fits, "cat"], n_soft=4, n_anchor=1, tokenizer=tokenizer)
    assert tpl.normal.pool_index.tolist()[0] == 76 and tpl.normal.token_ids.shape[1] == 77
    too_long = " ".join(["dog"] * 70)
    with pytest.raises(ValueError, match=rf"class name\(s\) '{too_long}' do not fit .*context length of 77"):
        AnchorPromptTemplate(open_clip_model, ["cat", too_long], n_soft=4, n_anchor=1, tokenizer=tokenizer)


def test_anchor_prompt_can_be_the_one_that_does_not_fit(open_clip_model, tokenizer) -> None:
    prep = "in the middle of the"  # 5 tokens
    # anchor prompt: SOS + 1 anchor + 5 + k + "." + EOT = k + 9; normal prompt: k + 4
    AnchorPromptTemplate(open_clip_model, ["cat " * 68], n_soft=0, preposition=prep, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"do not fit .*together with 1 prompt slot"):
        AnchorPromptTemplate(open_clip_model, ["cat " * 69], n_soft=0, preposition=prep, tokenizer=tokenizer)


def test_very_long_class_name_refused_by_name(open_clip_model, tokenizer) -> None:
    name = "an extraordinarily verbose class name " * 20
    with pytest.raises(ValueError, match=r"class name\(s\) 'an extraordinarily verbose.*do not fit"):
        AnchorPromptTemplate(open_clip_model, ["dog", name], tokenizer=tokenizer)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("classnames", "error", "message"),
    [
        ([], ValueError, "classnames is empty"),
        ("dog", TypeError, "classnames must be a list of strings"),
        (["dog", 3], TypeError, "class name #1 is a int, not a string: 3"),
        (["dog", None], TypeError, "class name #1 is a NoneType"),
        (["sea_lion", "dog", "sea lion"], ValueError, r"duplicate class names: \['sea lion'\]"),
        (["dog", " _ "], ValueError, "class name #1 is empty"),
    ],
    ids=["empty", "string", "int", "none", "duplicate", "blank"],
)
def test_bad_class_names(open_clip_model, tokenizer, classnames, error, message) -> None:
    with pytest.raises(error, match=message):
        AnchorPromptTemplate(open_clip_model, classnames, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_anchor": 0}, "n_anchor must be an int >= 1, got 0"),
        ({"n_anchor": 1.5}, "n_anchor must be an int >= 1, got 1.5"),
        ({"n_soft": -1}, "n_soft must be an int >= 0, got -1"),
        ({"n_soft": 2.0}, "n_soft must be an int >= 0, got 2.0"),
    ],
)
def test_bad_counts(open_clip_model, tokenizer, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AnchorPromptTemplate(open_clip_model, ["dog"], tokenizer=tokenizer, **kwargs)


def test_zero_soft_tokens_allowed(open_clip_model, tokenizer) -> None:
    tpl = AnchorPromptTemplate(open_clip_model, ["dog"], n_soft=0, n_anchor=1, tokenizer=tokenizer)
    assert tpl.normal.n_slots == 1


@pytest.mark.parametrize("shape", [(4, 64), (5, 32), (64,), (2, 4, 64)])
def test_slots_of_wrong_shape(template, shape) -> None:
    message = re.escape(f"slots must have shape (..., 5, 64), got {tuple(shape)}")
    with pytest.raises(ValueError, match=message):
        template.normal_prompts(torch.zeros(shape))


def test_anchor_slots_of_wrong_shape(template) -> None:
    with pytest.raises(ValueError, match=r"slots must have shape \(\.\.\., 1, 64\), got \(2, 64\)"):
        template.anchor_prompts(torch.zeros(2, 64))


def test_tokenizer_with_other_context_length(open_clip_model) -> None:
    from anchoropt.template import default_tokenizer

    with pytest.raises(ValueError, match="tokenizer pads to 32 tokens but the text tower has context length 77"):
        AnchorPromptTemplate(open_clip_model, ["dog"], tokenizer=default_tokenizer(32))


def test_tokenizer_returning_a_list(open_clip_model, tokenizer) -> None:
    with pytest.raises(TypeError, match=r"tokenizer must return a \(n, context_length\) tensor, got list"):
        AnchorPromptTemplate(open_clip_model, ["dog"], tokenizer=lambda texts, **kw: tokenizer(texts).tolist())
