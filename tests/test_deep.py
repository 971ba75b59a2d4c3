"""Deep AnchorOPT: per-layer soft prompts placed by the position matrix, anchors' own hidden states carried.

Hidden states are read with probe hooks registered after ours (a probe is a foreign hook, so the learner
then takes the hook path rather than the shared-prefix path).  Towers have 3 blocks: depth <= 2.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anchoropt import (
    AnchorOPTPromptLearner,
    DeepAnchorHooks,
    DeepPrompts,
    TextTower,
    attach_deep,
    load_prompt_learner,
    save_prompt_learner,
)
from anchoropt.io import CONFIG_NAME
from anchoropt.template import default_tokenizer
from anchoropt.testing import tiny_custom_text_clip, tiny_open_clip, tiny_openai_clip

CLASSES = ["cat", "golden retriever", "sea turtle"]
M, N, K = 4, 1, 5
S0 = 1  # first slot position (after SOS)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _frozen(model):
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def towers():
    return {
        "open_clip": _frozen(tiny_open_clip(layers=3)),
        "custom_text": _frozen(tiny_custom_text_clip(layers=3)),
        "openai": _frozen(tiny_openai_clip(layers=3, fp16=False)),
    }


def _learner(model, depth, seed=0, **kwargs):
    torch.manual_seed(seed)
    anchors = torch.randn(N, TextTower(model).width) * 0.02
    torch.manual_seed(seed + 1)
    return AnchorOPTPromptLearner(model, CLASSES, anchors, n_soft=M, deep_depth=depth, **kwargs)


def _fixed(learner, sources):
    """Put the learner in eval mode with a deterministic arrangement ``sources`` (source index per slot)."""
    learner.eval()
    with torch.no_grad():
        learner.position.logits.fill_(-5.0)
        learner.position.logits[torch.arange(K), torch.tensor(sources)] = 5.0
    return learner.position.matrix()


def _batch_first(x, tower):
    return x.permute(1, 0, 2) if tower.sequence_first else x


class _Probe:
    """Records each block's input (after any earlier pre-hook) and output, batch-first."""

    def __init__(self, tower):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for i, block in enumerate(tower.blocks):
            self.handles.append(block.register_forward_pre_hook(
                lambda m, args, i=i: self.inputs.__setitem__(i, _batch_first(args[0], tower).detach().clone())))
            self.handles.append(block.register_forward_hook(
                lambda m, args, out, i=i: self.outputs.__setitem__(i, _batch_first(out, tower).detach().clone())))

    def remove(self):
        for h in self.handles:
            h.remove()


def _remove(learner):
    if learner.deep_hooks is not None:
        learner.deep_hooks.remove()


# ---------------------------------------------------------------------- depth 0 and API
def test_depth_zero_is_exactly_the_shallow_learner(towers):
    model = towers["open_clip"]
    shallow, deep0 = _learner(model, 0), _learner(model, 0)
    assert deep0.deep is None and deep0.deep_hooks is None
    assert set(deep0.state_dict()) == {"soft", "anchors", "position.logits"}
    matrix = shallow.train().position.matrix()
    torch.testing.assert_close(deep0.normal_features(matrix), shallow.normal_features(matrix), rtol=0, atol=0)
    # zero-depth hooks install nothing and change nothing
    hooks = attach_deep(model, 0)
    assert not hooks.installed and all(not b._forward_pre_hooks for b in TextTower(model).blocks)


def test_deep_learner_owns_its_prompts(towers):
    learner = _learner(towers["open_clip"], 2)
    try:
        assert isinstance(learner.deep, DeepPrompts) and learner.deep.prompts.shape == (2, M, 64)
        assert learner.deep.prompts.dtype == torch.float32
        assert abs(float(learner.deep.prompts.detach().std()) - 0.02) < 0.005
        names = {name for name, _ in learner.named_parameters()}
        assert names == {"soft", "position.logits", "deep.prompts"}
        # the other tensors equal a shallow learner's for the same seed (deep prompts are created last)
        shallow = _learner(towers["open_clip"], 0)
        torch.testing.assert_close(learner.soft, shallow.soft, rtol=0, atol=0)
        torch.testing.assert_close(learner.position.logits, shallow.position.logits, rtol=0, atol=0)
    finally:
        _remove(learner)


@pytest.mark.parametrize("depth", [-1, 3, 7])
def test_bad_depth_raises(towers, depth):
    with pytest.raises(ValueError, match="depth"):
        _learner(towers["open_clip"], depth)
    with pytest.raises(ValueError, match="depth"):
        attach_deep(towers["openai"], depth)
    assert all(not b._forward_pre_hooks for b in TextTower(towers["open_clip"]).blocks)


def test_bad_inputs_raise(towers):
    with pytest.raises(TypeError):
        attach_deep(towers["open_clip"], 1.0)
    with pytest.raises(ValueError, match="depth"):
        DeepPrompts(0, M, 64)
    with attach_deep(towers["open_clip"], 2) as hooks:
        with pytest.raises(ValueError, match="position matrix"):
            with hooks.active(torch.eye(4), M, N, torch.zeros(2, M, 64)):
                pass
        with pytest.raises(ValueError, match="deep prompts"):
            with hooks.active(torch.eye(K), M, N, torch.zeros(1, M, 64)):
                pass
        with pytest.raises(ValueError, match="deep prompts"):
            with hooks.active(torch.eye(K), M, N, torch.zeros(2, M, 32)):
                pass
    assert not hooks.installed
    with pytest.raises(RuntimeError, match="removed"):
        with hooks.active(torch.eye(K), M, N, torch.zeros(2, M, 64)):
            pass


# ---------------------------------------------------------------------- what the blocks see
@pytest.mark.parametrize("layout", ["open_clip", "custom_text", "openai"])
@pytest.mark.parametrize("sources", [[1, 0, 4, 3, 3], [4, 2, 4, 0, 1]], ids=["anchor-mid", "anchor-first-repeated"])
def test_layer_slots_hold_layer_prompts_and_the_anchors_own_hidden_state(towers, layout, sources):
    learner = _learner(towers[layout], 2)
    tower = learner.tower
    probe = _Probe(tower)
    try:
        matrix = _fixed(learner, sources)
        with torch.no_grad():
            learner.normal_features(matrix)
        anchor_slot = sources.index(M)  # first slot holding the anchor
        for i in (1, 2):
            x_in, below = probe.inputs[i], probe.outputs[i - 1]
            for slot, src in enumerate(sources):
                row = x_in[:, S0 + slot]
                if src < M:  # a soft slot: layer i's own prompt, placed by the same P
                    torch.testing.assert_close(row, learner.deep.prompts[i - 1, src].expand_as(row), rtol=0, atol=0)
                else:  # an anchor slot: the anchor's own hidden state from block i-1 (its first slot)
                    carried = below[:, S0 + anchor_slot]
                    torch.testing.assert_close(row, carried, rtol=0, atol=0)
                    previous = below[:, S0 + anchor_slot - 1]  # what the released code carries
                    assert (row - previous).abs().max() > 1e-3
            # nothing else is touched
            torch.testing.assert_close(x_in[:, :S0], below[:, :S0], rtol=0, atol=0)
            torch.testing.assert_close(x_in[:, S0 + K:], below[:, S0 + K:], rtol=0, atol=0)
        # block 0 sees the input prompt: the soft tokens and anchor placed by P
        for slot, src in enumerate(sources):
            expected = learner.soft[src] if src < M else learner.anchors[0]
            emb = probe.inputs[0][:, S0 + slot] - tower.positional_embedding[S0 + slot]
            torch.testing.assert_close(emb, expected.detach().expand_as(emb), atol=1e-6, rtol=0)
    finally:
        probe.remove()
        _remove(learner)


def test_blocks_beyond_depth_are_untouched_and_a_dropped_anchor_contributes_nothing(towers):
    learner = _learner(towers["open_clip"], 1)
    probe = _Probe(learner.tower)
    try:
        sources = [0, 1, 2, 3, 0]  # no slot picks the anchor
        matrix = _fixed(learner, sources)
        with torch.no_grad():
            learner.normal_features(matrix)
        for slot, src in enumerate(sources):
            torch.testing.assert_close(probe.inputs[1][:, S0 + slot], learner.deep.prompts[0, src].expand(3, -1))
        torch.testing.assert_close(probe.inputs[2], probe.outputs[1], rtol=0, atol=0)
    finally:
        probe.remove()
        _remove(learner)


# ---------------------------------------------------------------------- gradients and the two paths
@pytest.mark.parametrize("layout", ["open_clip", "openai"])
def test_shared_prefix_path_equals_hook_path(towers, layout):
    learner = _learner(towers[layout], 2).train()
    tower = learner.tower
    try:
        pool = learner.template.normal.pool_index
        assert learner.deep_hooks.can_share_prefix(tower, S0 + K, pool)
        results = []
        for share in (True, False):
            tower.share_prefix = share
            torch.manual_seed(3)
            features = learner.normal_features()
            (features * torch.randn_like(features)).sum().backward()
            grads = [p.grad.clone() for p in (learner.soft, learner.position.logits, learner.deep.prompts)]
            learner.zero_grad(set_to_none=True)
            results.append((features.detach(), grads))
        torch.testing.assert_close(results[0][0], results[1][0], atol=2e-6, rtol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    finally:
        tower.share_prefix = True
        _remove(learner)


def test_shared_prefix_predicate_matches_the_towers(towers):
    """Our predicate is TextTower.can_share_prefix with our own hooks allowed (guards against drift)."""
    model = towers["open_clip"]
    tower = TextTower(model)
    pool = torch.tensor([8, 9, 12])
    cases = [(6, pool), (10, pool), (6, torch.tensor([5, 9]))]
    expected = [tower.can_share_prefix(n, p) for n, p in cases]
    with attach_deep(tower, 2) as hooks:
        assert [hooks.can_share_prefix(tower, n, p) for n, p in cases] == expected == [True, False, False]
        assert tower.can_share_prefix(6, pool)  # outside active() the hooks do nothing: plain passes stay fast
        with hooks.active(torch.eye(K), M, N):
            assert not tower.can_share_prefix(6, pool)  # ... but inside it they act: the tower refuses
            assert hooks.can_share_prefix(tower, 6, pool)  # (their owner reproduces them itself)
        model.set_grad_checkpointing(True)
        try:
            assert not hooks.can_share_prefix(tower, 6, pool)
        finally:
            model.set_grad_checkpointing(False)
        foreign = tower.blocks[0].register_forward_pre_hook(lambda *a: None)
        assert not hooks.can_share_prefix(tower, 6, pool)
        foreign.remove()
        assert hooks.can_share_prefix(tower, 6, pool)


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "hooks"])
def test_gradients_reach_every_layer_and_the_position_logits(towers, share):
    learner = _learner(towers["open_clip"], 2).train()
    learner.tower.share_prefix = share
    try:
        features = learner.normal_features()
        (features * torch.randn_like(features)).sum().backward()
        assert learner.soft.grad.abs().sum() > 0
        assert learner.position.logits.grad.abs().sum() > 0
        assert learner.anchors.grad is None
        per_layer = learner.deep.prompts.grad.abs().sum(dim=(1, 2))
        assert per_layer.shape == (2,) and bool((per_layer > 0).all())
    finally:
        learner.tower.share_prefix = True
        _remove(learner)


def test_position_logits_get_gradient_from_the_deep_layers(towers):
    """With the input layer's tokens made equal, only the deep layers can tell arrangements apart."""
    learner = _learner(towers["open_clip"], 2).train()
    try:
        with torch.no_grad():
            learner.soft.copy_(learner.anchors.expand(M, -1))
        features = learner.normal_features()
        (features * torch.randn_like(features)).sum().backward()
        assert learner.position.logits.grad.abs().sum() > 0
    finally:
        _remove(learner)


def _step(learner, seeds):
    """Sum of features of forwards with the given Gumbel seeds, then one backward; (features, grads)."""
    total, outs = 0.0, []
    for seed in seeds:
        torch.manual_seed(seed)
        features = learner.normal_features()
        outs.append(features.detach())
        weights = torch.linspace(-1, 1, features.numel(), device=features.device).view_as(features)
        total = total + (features * weights).sum()
    total.backward()
    grads = [p.grad.clone() for p in (learner.soft, learner.position.logits, learner.deep.prompts)]
    learner.zero_grad(set_to_none=True)
    return outs, grads


def test_gradient_checkpointing_gives_identical_outputs_and_gradients(towers):
    """Two forwards with different P before one backward: each recompute must replay its own forward."""
    model = towers["open_clip"]
    learner = _learner(model, 2).train()
    learner.tower.share_prefix = False  # compare the hook path with and without checkpointing
    try:
        plain = _step(learner, [11, 12])
        model.set_grad_checkpointing(True)
        replayed = _step(learner, [11, 12])
    finally:
        model.set_grad_checkpointing(False)
        learner.tower.share_prefix = True
        _remove(learner)
    for a, b in zip(plain[0] + plain[1], replayed[0] + replayed[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reentrant_checkpoint_is_refused(towers):
    tower = TextTower(towers["openai"])
    with attach_deep(tower, 1) as hooks:
        x = torch.randn(8, 2, 64, requires_grad=True)  # (L, C, D)
        with hooks.active(torch.eye(K), M, N, torch.zeros(1, M, 64, requires_grad=True)):
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                checkpoint(tower.blocks[1], x, use_reentrant=True)


# ---------------------------------------------------------------------- the tower stays the tower
def test_remove_restores_the_tower_and_other_passes_are_untouched(towers):
    model = towers["open_clip"]
    tower = TextTower(model)
    ids = default_tokenizer()(["a photo of a cat.", "X X X X X golden retriever."])
    before_model, before_tower = model.encode_text(ids), tower.encode_text(ids)
    shallow = _learner(model, 0)
    anchor_before = shallow.anchor_features()
    learner = _learner(model, 2).train()
    assert all(len(b._forward_pre_hooks) == 1 for b in list(tower.blocks)[1:])
    learner.normal_features().sum().backward()  # a deep forward leaves nothing active behind
    torch.testing.assert_close(model.encode_text(ids), before_model, rtol=0, atol=0)
    torch.testing.assert_close(tower.encode_text(ids), before_tower, rtol=0, atol=0)
    torch.testing.assert_close(learner.anchor_features(), anchor_before, rtol=0, atol=0)
    learner.deep_hooks.remove()
    learner.deep_hooks.remove()  # idempotent
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in tower.blocks)
    torch.testing.assert_close(model.encode_text(ids), before_model, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="removed"):
        learner.normal_features()


def test_a_finished_learners_hooks_leave_the_next_learner_exact_and_fast(towers):
    """A run that leaves its (dormant) deep hooks on the tower changes nothing for the next one on it."""
    model = towers["open_clip"]
    first = _learner(model, 2, seed=0)
    try:
        second = _learner(model, 2, seed=5)
        matrix = _fixed(second, [1, 0, 4, 3, 2])
        assert second.deep_hooks.can_share_prefix(second.tower, S0 + K, second.template.normal.pool_index)
        with torch.no_grad():
            beside = second.normal_features(matrix)
        _remove(second)
    finally:
        _remove(first)
    alone = _learner(model, 2, seed=5)
    try:
        with torch.no_grad():
            assert torch.equal(alone.normal_features(_fixed(alone, [1, 0, 4, 3, 2])), beside)
    finally:
        _remove(alone)


def test_two_deep_learners_on_one_tower_do_not_interfere(towers):
    model = towers["openai"]
    a, b = _learner(model, 2, seed=0), _learner(model, 2, seed=5)
    try:
        matrix = _fixed(a, [1, 0, 4, 3, 2])
        with torch.no_grad():
            alone = a.normal_features(matrix)
            a.tower.share_prefix = b.tower.share_prefix = False
            with b.deep_context(matrix):  # b's context must not leak into a's pass
                mixed = a.normal_features(matrix)
        torch.testing.assert_close(mixed, alone, atol=2e-6, rtol=1e-5)
    finally:
        a.tower.share_prefix = b.tower.share_prefix = True
        _remove(a)
        _remove(b)


def _copy_openai_text_into_open_clip(openai_model, open_clip_model):
    text = {k: v for k, v in openai_model.state_dict().items() if not k.startswith(("visual.", "logit_scale"))}
    missing, unexpected = open_clip_model.load_state_dict(text, strict=False)
    assert not unexpected
    assert not [k for k in missing if not k.startswith(("visual.", "logit_scale"))]


def test_sequence_first_and_batch_first_towers_agree():
    openai_model = _frozen(tiny_openai_clip(layers=3, fp16=False, seed=1))
    open_clip_model = _frozen(tiny_open_clip(layers=3, seed=2))
    _copy_openai_text_into_open_clip(openai_model, open_clip_model)
    features = {}
    for name, model in (("openai", openai_model), ("open_clip", open_clip_model)):
        learner = _learner(model, 2).train()
        for share in (True, False):
            learner.tower.share_prefix = share
            torch.manual_seed(7)
            features[name, share] = learner.normal_features().detach()
        _remove(learner)
    reference = features["openai", False]
    torch.manual_seed(7)
    shallow = _learner(openai_model, 0).train().normal_features().detach()  # same soft, anchors and P
    assert (reference - shallow).abs().max() > 1e-3
    for key, value in features.items():
        torch.testing.assert_close(value, reference, atol=2e-6, rtol=1e-5, msg=str(key))


def test_fp16_openai_tower_on_cpu():
    model = _frozen(tiny_openai_clip(layers=3, fp16=True))
    learner = _learner(model, 2).train()
    try:
        for share in (True, False):
            learner.tower.share_prefix = share
            features = learner.normal_features()
            assert features.dtype == torch.float32 and torch.isfinite(features).all()
            features.sum().backward()
            assert learner.deep.prompts.dtype == torch.float32
            assert bool((learner.deep.prompts.grad.abs().sum(dim=(1, 2)) > 0).all())
            learner.zero_grad(set_to_none=True)
    finally:
        _remove(learner)


def test_save_and_load_keep_the_deep_prompts(towers, tmp_path):
    model = towers["open_clip"]
    trained = _learner(model, 2)
    loaded = None
    try:
        with torch.no_grad():
            trained.deep.prompts.add_(torch.randn_like(trained.deep.prompts))
        trained.eval()
        save_prompt_learner(trained, tmp_path)
        config = json.loads((tmp_path / CONFIG_NAME).read_text())
        assert config["deep_depth"] == 2 and config["deep_length"] == M and config["format_version"] == 2
        loaded = load_prompt_learner(tmp_path, model, CLASSES).eval()
        torch.testing.assert_close(loaded.deep.prompts, trained.deep.prompts, rtol=0, atol=0)
        torch.testing.assert_close(loaded.normal_features(), trained.normal_features(), rtol=0, atol=0)
        shallow_dir = tmp_path / "shallow"
        save_prompt_learner(_learner(model, 0), shallow_dir)
        assert json.loads((shallow_dir / CONFIG_NAME).read_text())["format_version"] == 1
        assert load_prompt_learner(shallow_dir, model, CLASSES).deep is None
    finally:
        _remove(trained)
        if loaded is not None:
            _remove(loaded)


# ---------------------------------------------------------------------- MaPLe's list-passing blocks
class _MaPLeTextBlock(nn.Module):
    """Contract fake of MaPLe's ``ResidualAttentionBlock_MaPLe`` (text side), after peer_interfaces §3.2.

    ``forward([x, compound_prompts, counter])`` with ``x`` ``(L, C, D)``: every block but the first
    overwrites rows ``[1, 1 + n_ctx)`` with ``compound_prompts[counter]`` (cast ``.half()``) while
    ``counter <= len - 1`` and advances the counter, then runs attention and MLP; returns the list.
    Shares the weights (``ln_1, attn, ln_2, mlp``, ``attn_mask``) of a plain sequence-first block.
    """

    def __init__(self, plain: nn.Module, n_ctx: int, first_layer: bool):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = plain.ln_1, plain.attn, plain.ln_2, plain.mlp
        self.attn_mask = plain.attn_mask
        self.compound_prompt_nctx, self.first_layer = n_ctx, first_layer

    def attention(self, x):
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, inputs):
        x, compound_prompts_deeper, counter = inputs[0], inputs[1], inputs[2]
        if not self.first_layer and len(compound_prompts_deeper) > 0:
            if not counter > len(compound_prompts_deeper) - 1:
                ctx = compound_prompts_deeper[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2).half()
                x = torch.cat([x[:1], ctx, x[1 + self.compound_prompt_nctx:]], dim=0)
                counter += 1
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return [x, compound_prompts_deeper, counter]


class _MaPLeTransformer(nn.Module):
    def __init__(self, inner_blocks, n_ctx):
        super().__init__()
        self.resblocks = nn.Sequential(*[_MaPLeTextBlock(b, n_ctx, i == 0) for i, b in enumerate(inner_blocks)])

    def forward(self, inputs):
        return self.resblocks(inputs)


@pytest.fixture(scope="module")
def maple():
    model = _frozen(tiny_openai_clip(layers=3, fp16=False, seed=3))
    inner = list(model.transformer.resblocks)
    mask = torch.full((12, 12), float("-inf")).triu_(1)
    for block in inner:
        block.attn_mask = mask
    torch.manual_seed(4)
    compound = [nn.Parameter(torch.randn(M, 64) * 0.02) for _ in range(2)]  # PROMPT_DEPTH 3
    x = torch.randn(12, 3, 64)  # (L, C, D)
    return _MaPLeTransformer(inner, n_ctx=M), nn.Sequential(*inner), compound, x


def test_maple_blocks_without_context_behave_as_maple(maple):
    transformer, _, compound, x = maple
    with attach_deep(transformer, 2) as hooks:
        assert not hooks.batch_first
        out = transformer([x, compound, 0])
    reference = transformer([x, compound, 0])
    assert out[2] == reference[2] == 2 and out[1] is compound
    torch.testing.assert_close(out[0], reference[0], rtol=0, atol=0)


@pytest.mark.parametrize("own_prompts", [False, True], ids=["compound-prompts", "own-prompts"])
def test_maple_blocks_keep_our_arrangement(maple, own_prompts):
    transformer, plain_stack, compound, x = maple
    sources = [1, 4, 0, 3, 3]  # anchor at slot 1: MaPLe would overwrite it
    matrix = torch.eye(K)[sources]
    prompts = torch.randn(2, M, 64) * 0.02 if own_prompts else torch.stack(list(compound))
    inserted = prompts if own_prompts else prompts.half().to(prompts.dtype)  # MaPLe's block rounds its own
    seen, below = {}, {}  # (probes must return None: a returned value would replace the input / output)
    probe = transformer.resblocks[2].ln_1.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", a[0].clone()))
    probe_below = transformer.resblocks[1].register_forward_hook(
        lambda m, a, out: below.__setitem__("x", out[0].clone()))
    with attach_deep(transformer, 2) as hooks:
        with hooks.active(matrix, M, N, prompts if own_prompts else None):
            out = transformer([x, compound, 0])
    probe.remove()
    probe_below.remove()
    assert out[1] is compound and out[2] == 2  # MaPLe's list and counter as the block would leave them
    rows = seen["x"][S0:S0 + K]  # what block 2's attention saw, (K, C, D)
    for slot, src in enumerate(sources):
        if src < M:
            torch.testing.assert_close(rows[slot], inserted[1, src].expand(3, -1), rtol=0, atol=0)
        else:
            torch.testing.assert_close(rows[slot], below["x"][S0 + 1], rtol=0, atol=0)
    # the same weights as plain sequence-first blocks with the hooks give the same result
    with attach_deep(plain_stack, 2, batch_first=False) as hooks:
        with hooks.active(matrix, M, N, inserted):
            expected = plain_stack(x)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)
    # and the compound prompts (MaPLe's own parameters) get gradients through our arrangement
    if not own_prompts:
        with attach_deep(transformer, 2) as hooks, hooks.active(matrix, M, N):
            transformer([x, compound, 0])[0].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in compound)


def test_maple_depth_beyond_compound_prompts_needs_own_prompts(maple):
    transformer, _, compound, x = maple
    with attach_deep(transformer, 2) as hooks, hooks.active(torch.eye(K), M, N):
        with pytest.raises(ValueError, match="no compound prompt"):
            transformer([x, compound[:1], 0])


def test_hooks_are_plain_objects_not_modules():
    assert not issubclass(DeepAnchorHooks, nn.Module)  # never in a state_dict or an optimizer


# ---------------------------------------------------------------------- GPU
def _gpu_case(model, autocast_dtype=None):
    learner = _learner(model, 2).train()
    try:
        for share in (True, False):
            learner.tower.share_prefix = share
            with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                features = learner.normal_features()
            assert torch.isfinite(features).all()
            features.float().sum().backward()
            assert bool((learner.deep.prompts.grad.abs().sum(dim=(1, 2)) > 0).all())
            assert learner.position.logits.grad.abs().sum() > 0
            learner.zero_grad(set_to_none=True)
    finally:
        _remove(learner)


@pytest.mark.gpu
@cuda
def test_gpu_fp16_openai_tower():
    _gpu_case(_frozen(tiny_openai_clip(layers=3, fp16=True)).cuda())


@pytest.mark.gpu
@cuda
def test_gpu_bf16_open_clip_tower():
    _gpu_case(_frozen(tiny_open_clip(layers=3)).to("cuda", torch.bfloat16))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_amp_open_clip_tower(dtype):
    _gpu_case(_frozen(tiny_open_clip(layers=3)).cuda(), autocast_dtype=dtype)


@pytest.mark.gpu
@cuda
def test_gpu_checkpointing_matches():
    model = _frozen(tiny_open_clip(layers=3)).cuda()
    learner = _learner(model, 2).train()
    learner.tower.share_prefix = False
    try:
        plain = _step(learner, [1, 2])
        model.set_grad_checkpointing(True)
        replayed = _step(learner, [1, 2])
    finally:
        model.set_grad_checkpointing(False)
        _remove(learner)
    for a, b in zip(plain[0] + plain[1], replayed[0] + replayed[1]):
        torch.testing.assert_close(a, b)
