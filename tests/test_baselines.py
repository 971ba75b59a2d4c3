"""Baselines and the method registry: every method's prompt equals a hand-built reference sentence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anchoropt import AnchorOPTPromptLearner, TextTower
from anchoropt.template import text_tokens
from anchoropt.methods.baselines import ENSEMBLE_TEMPLATES, SoftPromptLearner, ZeroShotClassifier
from anchoropt.io import save_prompt_learner
from anchoropt.prompts import load_prompt_learner
from anchoropt.methods.registry import (
    Method,
    MethodSettings,
    available_methods,
    load_learner,
    parse_method,
    register_method,
    save_learner,
)
from anchoropt.template import default_tokenizer
from anchoropt.testing import tiny_custom_text_clip, tiny_open_clip, tiny_openai_clip

CLASSES = ["cat", "golden retriever", "axolotl"]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def _words(tower: TextTower, tok, words: str, n: int) -> torch.Tensor:
    """Token embeddings ``(n, D)`` of ``words`` (asserting they are ``n`` tokens)."""
    ids = tok([words])[0]
    assert int(ids.argmax()) == n + 1, f"{words!r} is not {n} tokens"
    return tower.embed(ids[None])[0, 1 : n + 1].float()


def _sentence_features(model, tok, sentences) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tok(sentences)).float(), dim=-1)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- zero-shot
def test_zeroshot_single_template_is_the_sentence(model, tok):
    zs = ZeroShotClassifier(model, CLASSES, "a photo of a {}, a type of pet.", tokenizer=tok)
    _close(zs.text_features(), _sentence_features(model, tok, [f"a photo of a {c}, a type of pet." for c in CLASSES]))


def test_zeroshot_ensemble_is_the_renormalised_mean(model, tok):
    zs = ZeroShotClassifier(model, CLASSES, ENSEMBLE_TEMPLATES, tokenizer=tok)
    per = torch.stack([_sentence_features(model, tok, [t.format(c) for c in CLASSES]) for t in ENSEMBLE_TEMPLATES])
    _close(zs.text_features(), F.normalize(per.mean(0), dim=-1))
    single = ZeroShotClassifier(model, CLASSES, ENSEMBLE_TEMPLATES[0], tokenizer=tok)
    assert not torch.allclose(zs.text_features(), single.text_features())
    with pytest.raises(ValueError, match="exactly one '{}'"):
        ZeroShotClassifier(model, CLASSES, "a photo of a cat.")


# ---------------------------------------------------------------- CoOp
@pytest.mark.parametrize("make", [tiny_open_clip, tiny_custom_text_clip, lambda: tiny_openai_clip(fp16=False)])
def test_coop_prompt_is_the_sentence(make, tok):
    model = make().eval()
    learner = SoftPromptLearner(model, CLASSES, n_soft=4, soft_init="a photo of a", tokenizer=tok)
    with torch.no_grad():
        _close(learner.text_features(), _sentence_features(model, tok, [f"a photo of a {c}." for c in CLASSES]))


def test_coop_class_specific_context(model, tok):
    tower = TextTower(model)
    learner = SoftPromptLearner(model, CLASSES, n_soft=4, class_specific=True, tokenizer=tok)
    contexts = ["a photo of a", "a bad photo of", "art of the"]
    sizes = [4, 4, 3]
    with torch.no_grad():
        for i, (words, n) in enumerate(zip(contexts, sizes)):
            emb = _words(tower, tok, words, n)
            learner.soft[i] = torch.cat([emb, _words(tower, tok, "big", 1)]) if n == 3 else emb
    expected = _sentence_features(model, tok, ["a photo of a cat.", "a bad photo of golden retriever.",
                                               "art of the big axolotl."])
    with torch.no_grad():
        _close(learner.text_features(), expected)
    assert learner.soft.shape == (3, 4, tower.width)
    with pytest.raises(ValueError, match="class-specific context"):
        learner.set_classnames(["dog", "cat"])


# ---------------------------------------------------------------- ATPrompt
def test_atprompt_keeps_a_multi_token_attribute_whole(model, tok):
    assert len(tok.encode("playfulness")) == 2  # play + fulness
    tower = TextTower(model)
    learner = SoftPromptLearner(model, CLASSES, n_soft=2, attributes=["playfulness", "energy"], n_attr_soft=2,
                                tokenizer=tok)
    assert learner.attribute_soft.shape == (4, tower.width)
    with torch.no_grad():
        learner.attribute_soft.copy_(torch.cat([_words(tower, tok, "the big", 2), _words(tower, tok, "a small", 2)]))
        learner.soft.copy_(_words(tower, tok, "photo of", 2))
        expected = _sentence_features(model, tok, [f"the big playfulness a small energy photo of {c}." for c in CLASSES])
        _close(learner.text_features(), expected)


def test_atprompt_init_std_as_released(model, tok):
    torch.manual_seed(0)
    learner = SoftPromptLearner(model, ["cat"] * 1, n_soft=16, attributes=["color", "shape"], n_attr_soft=16,
                                tokenizer=tok)
    assert 0.007 < learner.attribute_soft.std().item() < 0.013
    assert 0.015 < learner.soft.std().item() < 0.025


def test_atprompt_legacy_switch_reproduces_the_released_one_token_slice(model, tok):
    tower = TextTower(model)
    torch.manual_seed(0)
    learner = SoftPromptLearner(model, CLASSES, n_soft=2, attributes=["playfulness", "energy"], n_attr_soft=2,
                                legacy_single_token=True, tokenizer=tok)
    # the released code: tokenise 'X X playfulness X X energy X X {c}.', keep one token per attribute word
    ids = tok([f"X X playfulness X X energy X X {c}." for c in CLASSES])
    emb = tower.embed(ids).float()
    n_cls = len(CLASSES)
    att1, att2 = learner.attribute_soft[:2], learner.attribute_soft[2:]
    expand = (lambda t: t[None].expand(n_cls, -1, -1))
    prompts = torch.cat([emb[:, :1], expand(att1), emb[:, 3:4], expand(att2), emb[:, 6:7], expand(learner.soft),
                         emb[:, 9:]], dim=1)
    assert tok.decode(ids[0, 3:4].tolist()).strip() == "play" and tok.decode(ids[0, 6:7].tolist()).strip() == "x"
    with torch.no_grad():
        reference = F.normalize(tower.encode(prompts, ids.argmax(-1), ids).float(), dim=-1)
        _close(learner.text_features(), reference)
        whole = SoftPromptLearner(model, CLASSES, n_soft=2, attributes=["playfulness", "energy"], n_attr_soft=2,
                                  tokenizer=tok)
        whole.load_state_dict(learner.state_dict())
        assert not torch.allclose(whole.text_features(), reference, atol=1e-3)


# ---------------------------------------------------------------- AnchorOPT (+ATPrompt), released pooling
def test_anchoropt_on_an_atprompt_template_is_the_sentence(model, tok):
    tower = TextTower(model)
    learner = AnchorOPTPromptLearner(model, CLASSES, _words(tower, tok, "a", 1), n_soft=2, tokenizer=tok,
                                     arrangement="anchor_after", attributes=["playfulness"], n_attr_soft=1).eval()
    with torch.no_grad():
        learner.attribute_soft.copy_(_words(tower, tok, "the", 1))
        learner.soft.copy_(_words(tower, tok, "photo of", 2))
        _close(learner.normal_features(), _sentence_features(model, tok, [f"the playfulness photo of a {c}."
                                                                          for c in CLASSES]))
        _close(learner.anchor_features(), _sentence_features(model, tok, [f"a of {c}." for c in CLASSES]))


def _read_at(model, ids: torch.Tensor, offset: int) -> torch.Tensor:
    """open_clip CLIP's own modules, pooled at EOT - offset instead of EOT."""
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    pooled = x[torch.arange(ids.shape[0]), ids.argmax(-1) - offset]
    return F.normalize((pooled @ model.text_projection).float(), dim=-1)


@pytest.mark.parametrize("n_anchor", [1, 2])
def test_released_pooling_reads_eot_minus_n(model, tok, n_anchor):
    tower = TextTower(model)
    anchors = _words(tower, tok, "a big"[: 1 if n_anchor == 1 else 5], n_anchor)
    learner = AnchorOPTPromptLearner(model, CLASSES, anchors, n_soft=2, tokenizer=tok, arrangement="anchor_after",
                                     pooling="released").eval()
    paper = AnchorOPTPromptLearner(model, CLASSES, anchors, n_soft=2, tokenizer=tok).template.normal
    assert (paper.token_ids[torch.arange(len(CLASSES)), paper.pool_index] == 49407).all()  # the true EOT
    assert (learner.template.normal.pool_index == paper.pool_index - n_anchor).all()
    words = "a" if n_anchor == 1 else "a big"
    with torch.no_grad():
        learner.soft.copy_(_words(tower, tok, "photo of", 2))
        expected = _read_at(model, tok([f"photo of {words} {c}." for c in CLASSES]), n_anchor)
        _close(learner.normal_features(), expected)
        # the anchor prompt still reads the true EOT
        _close(learner.anchor_features(), _sentence_features(model, tok, [f"{words} of {c}." for c in CLASSES]))


def test_released_pooling_and_attributes_survive_save_and_load(model, tok, tmp_path):
    torch.manual_seed(0)
    learner = AnchorOPTPromptLearner(model, CLASSES, torch.randn(1, TextTower(model).width) * 0.02, n_soft=2,
                                     tokenizer=tok, attributes=["playfulness", "energy"], pooling="released").eval()
    save_prompt_learner(learner, tmp_path / "pl")
    loaded = load_prompt_learner(tmp_path / "pl", model, CLASSES, tokenizer=tok).eval()
    assert loaded.attributes == ("playfulness", "energy") and loaded.pooling == "released"
    with torch.no_grad():
        _close(loaded.normal_features(), learner.normal_features())


# ---------------------------------------------------------------- registry
def test_registry_lists_the_paper_methods():
    assert {"zeroshot", "coop", "coop+atprompt", "coop+anchoropt", "coop+atprompt+anchoropt"} <= set(
        available_methods())


def test_method_specs_are_parsed_and_checked():
    choice = parse_method("coop+anchoropt:pooling=released,tau=0.5")
    assert choice.method.name == "coop+anchoropt" and choice.options == {"pooling": "released", "tau": 0.5}
    assert choice.slug == "coop+anchoropt-pooling-released-tau-0.5"
    assert parse_method("coop+atprompt:attributes=color|shape,legacy=true").options == {
        "attributes": ("color", "shape"), "legacy": True}
    assert parse_method("coop:csc=true").settings(MethodSettings()).csc is True
    with pytest.raises(KeyError, match="unknown method 'prograd'"):
        parse_method("prograd")
    with pytest.raises(ValueError, match="has no option 'pooling'"):
        parse_method("coop:pooling=released")
    with pytest.raises(ValueError, match="takes true or false"):
        parse_method("coop:csc=maybe")
    with pytest.raises(ValueError, match="must be key=value"):
        parse_method("coop:csc")


def test_heads_and_eval_modes():
    anchoropt = parse_method("coop+anchoropt").method
    assert (anchoropt.head(True), anchoropt.head(False), anchoropt.head(True, "anchor")) == (
        "normal", "ensemble", "anchor")
    with pytest.raises(ValueError, match="does not apply to method 'coop'"):
        parse_method("coop").method.head(True, "novel")


def test_a_new_method_is_one_registration(model, tok):
    method = Method("coop-test-entry", "CoOp with a fixed init", lambda m, c, s: SoftPromptLearner(
        m, c, n_soft=4, soft_init="a photo of a", tokenizer=s.tokenizer), options=("n_soft",))
    register_method(method)
    with pytest.raises(ValueError, match="already registered"):
        register_method(method)
    learner = parse_method("coop-test-entry").method.build(model, CLASSES, MethodSettings(tokenizer=tok))
    assert set(learner.heads(torch.randn(2, TextTower(model).output_dim))) == {"prompt"}


@pytest.mark.parametrize("spec", ["coop+atprompt:attributes=playfulness|energy", "coop+anchoropt", "zeroshot"])
def test_save_and_load_any_method(model, tok, tmp_path, spec):
    torch.manual_seed(0)
    choice = parse_method(spec)
    settings = choice.settings(MethodSettings(n_soft=2, tokenizer=tok, anchors=torch.randn(1, TextTower(model).width)))
    learner = choice.method.build(model, CLASSES, settings).eval()
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_learner(learner, choice, settings, tmp_path / "learner")
    loaded, again = load_learner(tmp_path / "learner", model, CLASSES, tokenizer=tok)
    assert again.label == spec
    features = torch.randn(3, TextTower(model).output_dim)
    for name, logits in learner.heads(features).items():
        _close(loaded.eval().heads(features)[name], logits)


# ---------------------------------------------------------------------- an init phrase longer than M (MaPLe)
def _full_pass(model, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on given token embeddings ``(C, 77, D)``: all 77 positions, pooled at EOT."""
    with torch.no_grad():
        x = embeddings + model.positional_embedding
        for block in model.transformer.resblocks:
            x = block(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection


def test_a_longer_init_phrase_keeps_its_other_words_before_the_class(model, tok) -> None:
    """Released MaPLe's CTX_INIT "a photo of a" with N_CTX 2: [SOS] ctx ctx of a {class} . [EOT]."""
    tower = TextTower.from_model(model)
    learner = SoftPromptLearner(model, CLASSES, n_soft=2, soft_init="a photo of a")
    assert learner.context_words == "of a" and learner.n_soft == 2
    torch.testing.assert_close(learner.soft.detach(), _words(tower, tok, "a photo", 2), rtol=0, atol=0)
    layout = learner.template.prompt
    assert layout.slot_positions == (1, 2)
    ids = tok([f"a photo of a {name}." for name in CLASSES])  # the hand-built reference sentences
    filled = learner.template.fill(layout, learner.soft.detach())
    L = filled.shape[1]
    assert torch.equal(layout.token_ids[:, 3:], ids[:, 3:L]) and torch.equal(layout.pool_index, ids.argmax(-1))
    with torch.no_grad():  # at init the prompt is the sentence itself
        torch.testing.assert_close(filled, model.token_embedding(ids)[:, :L], rtol=0, atol=0)
        torch.testing.assert_close(learner.text_features(), F.normalize(model.encode_text(ids).float(), dim=-1),
                                   atol=1e-5, rtol=1e-5)
        learner.soft.add_(torch.randn_like(learner.soft))  # a trained context: still [SOS] ctx ctx of a {class} .
        reference = model.token_embedding(ids).clone()
        reference[:, 1:3] = learner.soft
        torch.testing.assert_close(learner.text_features(), F.normalize(_full_pass(model, reference, ids), dim=-1),
                                   atol=1e-5, rtol=1e-4)
    learner.train()
    learner(torch.randn(2, tower.output_dim)).sum().backward()
    assert learner.soft.grad is not None and learner.soft.grad.abs().sum() > 0
    assert [n for n, p in learner.named_parameters() if p.grad is not None] == ["soft"]
    assert all(p.grad is None for p in model.parameters())


def test_a_longer_init_phrase_on_atprompt_and_class_specific(model, tok) -> None:
    at = SoftPromptLearner(model, CLASSES, n_soft=2, soft_init="a photo of a", attributes=["color"], n_attr_soft=1)
    assert at.template.layout_texts(at.template.prompt)[0] == "X color X X of a cat."
    csc = SoftPromptLearner(model, CLASSES, n_soft=2, soft_init="a photo of a", class_specific=True)
    assert csc.soft.shape[:2] == (3, 2) and csc.text_features().shape == (3, model.text_projection.shape[1])


def test_an_init_phrase_shorter_than_m_or_split_inside_a_word_is_refused(model) -> None:
    with pytest.raises(ValueError, match="gives 4 tokens but n_soft is 5: the phrase needs at least n_soft"):
        SoftPromptLearner(model, CLASSES, n_soft=5, soft_init="a photo of a")
    with pytest.raises(ValueError, match="end inside a word"):
        SoftPromptLearner(model, CLASSES, n_soft=2, soft_init="a playfulness")  # "play" + "fulness"
    with pytest.raises(ValueError, match="non-empty words"):
        SoftPromptLearner(model, CLASSES, n_soft=2, soft_init="  ")


def _siglip_like_tokenizer(tok, end: int = 1):
    """CLIP BPE ids as SigLIP's tokenizer lays them out: no start token, the end token also pads."""

    def tokenize(texts):  # no context_length argument; a text longer than the context is cut, its end token lost
        ids = tok(texts, context_length=1024)
        out = torch.full((len(texts), 77), end, dtype=ids.dtype)
        for row, sentence in enumerate(ids):
            words = [int(t) for t in sentence[1:int(sentence.argmax())]][:77]  # between SOS and EOT
            out[row, :len(words)] = torch.tensor(words, dtype=ids.dtype)
        return out

    return tokenize


def test_init_words_are_found_without_assuming_a_start_or_end_token(tok) -> None:
    siglip_tok = _siglip_like_tokenizer(tok)
    for tokenizer in (tok, siglip_tok):
        assert text_tokens(tokenizer, "a photo of a").tolist() == tok(["a photo of a"])[0, 1:5].tolist()
        assert text_tokens(tokenizer, "").numel() == 0
    model = tiny_custom_text_clip(no_causal_mask=True, pool_type="last").eval().requires_grad_(False)
    learner = SoftPromptLearner(model, CLASSES, n_soft=2, soft_init="a photo of a", tokenizer=siglip_tok)
    assert learner.context_words == "of a"
    tower = TextTower.from_model(model)
    expected = tower.embed(tok(["a photo"])[:, 1:3])[0].float()
    torch.testing.assert_close(learner.soft.detach(), expected, rtol=0, atol=0)
    ids = siglip_tok([f"a photo of a {name}." for name in CLASSES])
    with torch.no_grad():  # at init the prompt is the sentence itself, through the tower's own forward
        torch.testing.assert_close(learner.text_features(), F.normalize(model.encode_text(ids).float(), dim=-1),
                                   atol=1e-5, rtol=1e-5)


def test_a_tokenizer_that_pads_with_its_end_token_is_read_right(tok) -> None:
    """Padding is the empty text's last id, not 0: no false 'cut off' for short names and sentences."""
    import warnings

    from anchoropt import AnchorLearner

    siglip_tok = _siglip_like_tokenizer(tok)
    model = tiny_custom_text_clip(no_causal_mask=True, pool_type="last").eval().requires_grad_(False)
    stage1 = AnchorLearner(model, ["cat"], tokenizer=siglip_tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage1.targets({"cat": ["a photo of a cat."]})
    with pytest.warns(UserWarning, match="fill the text tower's 77 tokens and are cut"):
        stage1.targets({"cat": ["a cat " * 125 + "."]})
    with pytest.raises(ValueError, match="do not fit the text tower's context length"):
        SoftPromptLearner(model, ["cat " * 80], n_soft=2, tokenizer=siglip_tok)
