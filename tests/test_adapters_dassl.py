"""Dassl glue: the TRAINER.ANCHOROPT node, option precedence, mode from SUBSAMPLE_CLASSES, optimizer rebuild
after a post-build wrap; shift_token_ids; the package surface."""

from __future__ import annotations

import types

import pytest
import torch

import peer_fakes as pf
import anchoropt.adapters as adapters
from anchoropt.adapters import coop, dassl, find, shift_token_ids


def test_extend_cfg_adds_defaults_and_keeps_user_values() -> None:
    cfg = pf.make_cfg("coop")
    cfg.TRAINER.ANCHOROPT = types.SimpleNamespace(KD_WEIGHT=1000.0)
    dassl.extend_cfg(cfg)
    node = cfg.TRAINER.ANCHOROPT
    assert node.KD_WEIGHT == 1000.0 and node.GUMBEL_TEMP == 1.0 and node.MODE == "auto"
    assert set(dassl.DEFAULTS) <= set(vars(node))
    assert dassl.extend_cfg(cfg) is cfg  # idempotent
    fresh = dassl.extend_cfg(pf.make_cfg("coop"))
    assert dassl.options_from_cfg(fresh) == {
        "tau": 1.0, "position_init": "randn", "arrangement": "learned", "sample_in_eval": False,
        "preposition": "of", "ce_weight": 1.0, "kd_temperature": 1.0, "kd_normalization": "batchmean",
        "deep": True,
    }  # method defaults (KD_WEIGHT < 0, MODE/ANCHOR_IMAGE auto, no ANCHORS) are left to the shim
    with pytest.raises(AttributeError, match="TRAINER"):
        dassl.extend_cfg(types.SimpleNamespace())


def test_option_precedence_and_mode() -> None:
    cfg = dassl.extend_cfg(pf.make_cfg("coop", subsample="new"))
    cfg.TRAINER.ANCHOROPT.KD_WEIGHT = 100.0
    cfg.TRAINER.ANCHOROPT.PREPOSITION = ""
    options = dassl.resolve_options(cfg, {"kd_temperature": 4.0, "anchors": None}, {"kd_weight": 0.0})
    assert options["kd_weight"] == 100.0 and options["kd_temperature"] == 4.0 and options["mode"] == "novel"
    assert options["preposition"] is None and "anchors" not in options and "anchor_image" not in options
    assert dassl.resolve_options(None, {}, {"kd_weight": 0.0}) == {"kd_weight": 0.0, "mode": "base"}
    assert [dassl.mode_from_cfg(pf.make_cfg(subsample=s)) for s in ("base", "new", "all")] == ["base", "novel", "novel"]
    assert dassl.mode_from_cfg(types.SimpleNamespace()) == "base"


def test_rebuild_optimizer_after_a_post_build_wrap() -> None:
    """A trainer that was built without AnchorOPT: wrap, then rebuild its optimizer the Dassl way."""
    clip_model = pf.tiny_clip("fp32")
    cfg = pf.make_cfg("coop")
    model, optim, registered = pf.build_model("coop", cfg, pf.BASE, clip_model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10)
    trainer = types.SimpleNamespace(cfg=cfg, model=model, optim=optim, sched=sched,
                                    _models={"prompt_learner": registered}, _optims={"prompt_learner": optim},
                                    _scheds={"prompt_learner": sched})
    h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64),
                  owner=model)
    assert id(h.position.logits) not in {id(p) for g in trainer.optim.param_groups for p in g["params"]}

    def build_optimizer(module, optim_cfg):  # Dassl's signature; DePT's returns (optim, infos)
        return torch.optim.SGD(module.parameters(), lr=optim_cfg.LR), {"info": 1}

    def build_lr_scheduler(optimizer, optim_cfg):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)

    dassl.rebuild_optimizer(trainer, build_optimizer, build_lr_scheduler)
    assert trainer._optims["prompt_learner"] is trainer.optim and trainer._scheds["prompt_learner"] is trainer.sched
    assert id(h.position.logits) in {id(p) for g in trainer.optim.param_groups for p in g["params"]}
    with pytest.raises(KeyError, match="registered"):
        dassl.rebuild_optimizer(trainer, build_optimizer, build_lr_scheduler, name="MultiModalPromptLearner")


def test_shift_token_ids() -> None:
    ids = pf.tokenize(["X X cat.", "X X golden retriever."]).long()
    shifted = shift_token_ids(ids, 2, 1, ["cat", "golden retriever"])
    assert shifted.shape == ids.shape
    assert torch.equal(shifted.argmax(-1), ids.argmax(-1) + 1)
    assert torch.equal(shifted[:, :3], ids[:, :3]) and torch.equal(shifted[:, 4:], ids[:, 3:-1])
    assert bool((shifted[:, 3] < 49407).all())
    with pytest.raises(ValueError, match="context token"):
        shift_token_ids(ids, 5, 1, ["cat", "golden retriever"])


def test_find_unwraps_containers() -> None:
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(pf.make_cfg("coop"), pf.BASE, clip_model)
    h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, anchors=torch.zeros(1, 64))
    assert find(torch.nn.Sequential(model)) is h and find(model.prompt_learner) is h
    assert "kind='coop'" in repr(h) and set(adapters.METHODS) == {"coop", "cocoop", "maple", "dept"}
    for module in adapters.METHODS.values():
        assert callable(module.patch) and callable(module.wrap)


@pytest.mark.filterwarnings("ignore:MaPLe PROMPT_DEPTH")
def test_wrap_reads_the_config_node(tmp_path) -> None:
    from anchoropt import save_anchors
    from anchoropt.adapters import maple

    path = save_anchors(torch.full((1, 64), 0.1), tmp_path / "anchors.safetensors")
    cfg = dassl.extend_cfg(pf.make_cfg("coop", subsample="new"))
    node = cfg.TRAINER.ANCHOROPT
    node.ANCHORS, node.ANCHOR_IMAGE, node.KD_NORMALIZATION = str(path), "model", "released"
    clip_model = pf.tiny_clip("fp32")
    model = pf.coop.CustomCLIP(cfg, pf.BASE, clip_model)
    h = coop.wrap(model.prompt_learner, clip_model=clip_model, classnames=pf.BASE, owner=model, cfg=cfg)
    assert torch.equal(h.anchors, torch.full((1, 64), 0.1)) and h.mode == "novel"  # ANCHOR_IMAGE: MaPLe only
    assert (h.loss_config.kd_weight, h.loss_config.kd_normalization) == (10.0, "released")
    maple_clip = pf.tiny_maple_clip("fp32", n_ctx=2)
    mmodel = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=2), pf.BASE, maple_clip)
    hm = maple.wrap(mmodel.prompt_learner, clip_model=maple_clip, classnames=pf.BASE, cfg=cfg)
    assert hm.anchor_image == "model" and hm.deep  # DEEP True (the default) reaches MaPLe only
    node.ANCHOR_IMAGE = "auto"
    other = pf.maple.CustomCLIP(pf.make_cfg("maple", n_ctx=2), pf.BASE, maple_clip)
    assert maple.wrap(other.prompt_learner, clip_model=maple_clip, classnames=pf.BASE, cfg=cfg).anchor_image == "vanilla"


def test_documented_load_model_fix_reads_a_dassl_checkpoint_on_new_torch(tmp_path) -> None:
    """Dassl's checkpoints pickle the scheduler's successor (a CosineAnnealingLR holding the SGD optimizer):
    torch >= 2.6 refuses them with its default weights_only=True; the docs' fix reads the state_dict without
    running pickled code (anchoropt.official.read_dassl_state_dict)."""
    from anchoropt.official import read_dassl_state_dict

    with coop.patch(pf.coop, anchors=torch.randn(1, 64)):
        _, optim, registered = pf.build_model("coop", pf.make_cfg("coop"), pf.BASE, pf.tiny_clip())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10)
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": registered.state_dict(), "epoch": 1, "optimizer": optim.state_dict(),
                "scheduler": {"successor": scheduler, "warmup_epoch": 1}, "val_result": None}, path)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, map_location="cpu")  # what Dassl's load_checkpoint does: fails on torch >= 2.6
    with coop.patch(pf.coop, anchors=torch.randn(1, 64)):
        _, _, novel_registered = pf.build_model("coop", pf.make_cfg("coop", subsample="new"), pf.NOVEL,
                                                    pf.tiny_clip())
    pf.dassl_load(novel_registered, read_dassl_state_dict(path))  # the fixed load_model
    assert torch.equal(novel_registered.anchoropt.position.logits, registered.anchoropt.position.logits)
    assert torch.equal(novel_registered.ctx, registered.ctx)
