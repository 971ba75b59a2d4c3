"""The runner's defaults (``--recipe``): each method's released recipe, the docs' table of them, the named
alternatives (``paper-text``, ``legacy``) and how a run records its recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import anchoropt.methods  # noqa: F401  (registers every entry)
from anchoropt.methods.entries import PRESET_METHOD
from anchoropt.methods.recipes import (LEGACY, METHOD_KEYS, PAPER_TEXT_LOSS, RECIPES, RUN_KEYS, _COOP_MODULE,
                                       recipe_method_settings, recipe_values, released_recipe)
from anchoropt.runner import RunConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "runner.md"
PACKAGE_METHODS = (*_COOP_MODULE, *PRESET_METHOD)

# The released values, read in the releases (zhengli97/ATPrompt 86980a1, KaiyangZhou/CoOp ff61507, Koorye/DePT):
# (M, epochs, batch, lr, CE, KD, KD normalisation, T); None where the method does not distil.
RELEASED = {
    # CoOp configs/trainers/CoOp/vit_b16.yaml:3,17-18; COOP.md:22 (M 16); plain CE
    "coop": (16, 200, 32, 0.002, 1.0, 0.0, None, None),
    # ATPrompt scripts/coop/atprompt_base2new_train.sh:11-12 (EPO 100, NCTX 2)
    "coop+atprompt": (2, 100, 32, 0.002, 1.0, 0.0, None, None),
    # AnchorOPT scripts/coop/anchoropt_base2new_train.sh:13-17; trainers/coop_anchoropt.py:425-441 (sum / B*C)
    "coop+anchoropt": (4, 100, 32, 0.002, 100.0, 1000.0, "released", 1.0),
    "coop+atprompt+anchoropt": (4, 100, 32, 0.002, 100.0, 1000.0, "released", 1.0),
    # KgCoOp (htyao89/KgCoOp) configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml:3,15,17; base2new_train.sh NCTX 4
    "kgcoop": (4, 100, 128, 0.002, 1.0, 0.0, None, None),
    # CoCoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml:3,17-18,33
    "cocoop": (4, 10, 1, 0.002, 1.0, 0.0, None, None),
    # docs/ATPrompt.md:191 (NCTX 2 on 7 of 11 datasets, EPO 10)
    "cocoop+atprompt": (2, 10, 1, 0.002, 1.0, 0.0, None, None),
    # scripts/cocoop/anchoropt_base2new_train.sh:14-18
    "cocoop+anchoropt": (4, 20, 1, 0.002, 100.0, 1000.0, "released", 1.0),
    # MaPLe configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml:3,17-18,33
    "maple": (2, 5, 4, 0.0035, 1.0, 0.0, None, None),
    # docs/ATPrompt.md:199-203 (NCTX 4 on 9 of 11 datasets, EPO 5 on 7)
    "maple+atprompt": (4, 5, 4, 0.0035, 1.0, 0.0, None, None),
    # scripts/maple/anchoropt_base2new_train.sh:14-18
    "maple+anchoropt": (4, 10, 4, 0.0035, 100.0, 1000.0, "released", 1.0),
    # DePT configs/trainers/ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml:3,17-18
    "dept": (4, 10, 4, 0.0035, 1.0, 0.0, None, None),
    # docs/ATPrompt.md:209 (NCTX 4, EPO 10)
    "dept+atprompt": (4, 10, 4, 0.0035, 1.0, 0.0, None, None),
    # scripts/dept/anchoropt_base2new_train.sh:14-17 (PROMPT_CE_WEIGHT 1.0, no KD)
    "dept+anchoropt": (4, 10, 4, 0.0035, 1.0, 0.0, None, None),
}
# the settings beyond the run options: CTX_INIT of the CoCoOp / MaPLe configs (:34), MaPLe's .half() prompts,
# DePT's w (scripts' WEIGHT=0.7)
RELEASED_SETTINGS = {
    "cocoop": {"soft_init": "a photo of a"}, "kgcoop": {"soft_init": "a photo of a", "kg_weight": 8.0},
    "maple": {"soft_init": "a photo of a", "fp16_prompts": True},
    "maple+atprompt": {"fp16_prompts": True}, "maple+anchoropt": {"fp16_prompts": True},
    **{f"dept{suffix}": {"lp_weight": 0.7} for suffix in ("", "+atprompt", "+anchoropt")},
}
# Dassl's SGD (defaults.py:153-154), the configs' warm-up (vit_b16.yaml:20-22), Dassl's loader (data_manager.py:45),
# AnchorOPT's N 1 / tau 1 (scripts :9-10) and Stage I (docs/AnchorOPT.md:118-131)
SHARED = dict(shots=16, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5, drop_last=True, n_anchor=1,
              tau=1.0, stage1_mse_weight=1000.0, stage1_lr=0.002, max_descriptions=10)
COLUMNS = ("n_soft", "epochs", "batch_size", "lr", "ce_weight", "kd_weight", "kd_normalization", "kd_temperature")


def _expected(name: str) -> dict:
    values = dict(zip(COLUMNS, RELEASED[name]))
    return {k: v for k, v in values.items() if v is not None}


@pytest.mark.parametrize("name", list(RELEASED))
def test_the_code_gives_each_method_its_released_values(name) -> None:
    recipe = released_recipe(name)
    assert {k: recipe[k] for k in _expected(name)} == _expected(name)
    assert {k: recipe[k] for k in SHARED} == SHARED
    assert {k: v for k, v in recipe.items() if k in METHOD_KEYS} == RELEASED_SETTINGS.get(name, {})


def test_every_entry_of_the_package_has_a_released_recipe() -> None:
    assert set(RELEASED) | {"zeroshot"} == set(PACKAGE_METHODS)
    for name in PACKAGE_METHODS:
        assert set(RUN_KEYS) <= set(released_recipe(name)), name


def _doc_rows() -> dict[str, list[str]]:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("<!-- defaults-table"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def _other(text: str) -> dict:
    words = {"true": True, "false": False}
    pairs = (item.strip().split(" ", 1) for item in text.split(",") if item.strip())
    return {key: words[value] if value in words else _number(value) for key, value in pairs}


def test_the_docs_table_matches_the_code() -> None:
    rows = _doc_rows()
    assert set(rows) == {*PACKAGE_METHODS, "every method"}
    assert all(cell == "-" for cell in rows["zeroshot"][:-1]), "zero-shot trains nothing"
    for name in RELEASED:
        recipe, cells = released_recipe(name), rows[name]
        assert all(cells[-1]), f"{name}: no source"
        for key, cell in zip(COLUMNS, cells):
            if cell == "-":  # not used: no distillation
                assert recipe["kd_weight"] == 0 and key in ("kd_normalization", "kd_temperature"), (name, key)
            else:
                assert (cell if key == "kd_normalization" else _number(cell)) == recipe[key], (name, key)
        init = cells[len(COLUMNS)]
        assert recipe.get("soft_init") == (None if init == "random" else init), name
        extra = {k: v for k, v in recipe.items() if k in METHOD_KEYS and k != "soft_init"}
        assert _other(cells[len(COLUMNS) + 1]) == extra, name
    shared = _other(rows["every method"][len(COLUMNS) + 1])
    assert shared == SHARED and all(released_recipe(n)[k] == v for n in RELEASED for k, v in shared.items())


@pytest.mark.parametrize("name", list(RELEASED))
def test_a_run_without_preset_trains_the_released_recipe(name) -> None:
    cfg = RunConfig(method=name).resolve()
    assert cfg.recipe == "released"
    assert {k: getattr(cfg, k) for k in RUN_KEYS} == recipe_values("released", name)
    assert {k: getattr(cfg, k) for k in _expected(name)} == _expected(name)


def test_explicit_options_beat_the_preset_which_beats_the_recipe() -> None:
    cfg = RunConfig(method="cocoop", preset="dtd", epochs=3).resolve()
    assert (cfg.epochs, cfg.batch_size) == (3, 1)  # the option, then CoCoOp's table
    assert RunConfig(method="coop+anchoropt", preset="dtd").resolve().kd_weight == 10.0  # the DTD row
    assert RunConfig(method="coop", recipe="legacy", n_soft=8).resolve().n_soft == 8


def test_the_named_alternatives_give_the_old_values() -> None:
    for name in PACKAGE_METHODS:
        legacy = RunConfig(method=name, recipe="legacy").resolve()
        assert {k: getattr(legacy, k) for k in RUN_KEYS} == LEGACY, name
        assert recipe_method_settings("legacy", name) == {}
    # the defaults before this change, for every method
    assert (LEGACY["ce_weight"], LEGACY["kd_weight"], LEGACY["kd_normalization"], LEGACY["n_soft"],
            LEGACY["epochs"], LEGACY["drop_last"]) == (1.0, 10.0, "batchmean", 4, 100, False)
    paper = RunConfig(method="coop+anchoropt", recipe="paper-text").resolve()
    assert (paper.ce_weight, paper.kd_weight, paper.kd_temperature, paper.kd_normalization) == (1.0, 10.0, 1.0,
                                                                                                "batchmean")
    assert paper.epochs == 100 and paper.n_soft == 4  # the released schedule
    assert {k: getattr(RunConfig(method="cocoop+anchoropt", recipe="paper-text").resolve(), k)
            for k in PAPER_TEXT_LOSS} == PAPER_TEXT_LOSS
    assert RunConfig(method="coop", recipe="paper-text").resolve().epochs == 200  # no KD: the released recipe
    assert RunConfig(method="dept+anchoropt", recipe="paper-text").resolve().kd_weight == 0.0


def test_a_bad_recipe_name_is_refused_clearly() -> None:
    for bad in ("paper", "Released", ""):
        with pytest.raises(ValueError, match=r"unknown --recipe .*released, paper-text, legacy"):
            RunConfig(recipe=bad).resolve()
    with pytest.raises(ValueError, match="recipe"):
        RunConfig.from_json({"recipe": 3}).validate()


def test_the_recipe_is_recorded_and_read_back() -> None:
    from anchoropt.runner.cli import _config, build_parser

    parser = build_parser()
    for recipe in RECIPES:
        args = parser.parse_args(["train", "--data", "d", "--recipe", recipe])
        cfg = _config(args).resolve()
        assert cfg.to_json()["recipe"] == recipe and RunConfig.from_json(cfg.to_json()).recipe == recipe
    assert _config(parser.parse_args(["train", "--data", "d"])).recipe == "released"
    grid = parser.parse_args(["grid", "--methods", "coop", "--data", "d", "--recipe", "legacy"])
    assert grid.recipe == "legacy"
    assert RunConfig.from_json({"method": "coop"}).recipe == "legacy"  # written before --recipe


def test_the_method_settings_come_from_the_recipe_without_a_preset() -> None:
    from anchoropt.runner.learners import method_settings

    assert method_settings(RunConfig(method="cocoop").resolve(), None, None).soft_init == "a photo of a"
    assert method_settings(RunConfig(method="cocoop", recipe="legacy").resolve(), None, None).soft_init is None
    assert method_settings(RunConfig(method="maple").resolve(), None, None).fp16_prompts is True
    spec = method_settings(RunConfig(method="maple:fp16_prompts=false").resolve(), None, None)
    assert spec.fp16_prompts is False  # the spec's option wins
