"""The registry of comparison rows and export variants (`tpad_jax/rows.py`) against what reads it."""

import importlib

import pytest

from configs import tpad_base
from tpad_jax import evaluate, layout, provenance, rows
from tpad_jax.cli import UserError
from tpad_jax.downstream import settings
from tpad_jax.eval import baselines
from tpad_jax.models import session_encoders
from tpad_jax.train import stages

CONFIGS = ("tpad_base", "tpad_smollm2", "tpad_llava7b", "tpad_qwen2_siglip", "tpad_prior")
# One more ablation, as a contributor would add it: a stage-2 variant and the row that reads its export.
NO_KEEP = rows.ExportVariant("no-keep", rows.STAGE2, {"keep_weight": 0.0})
NO_KEEP_ROW = rows.Row("tpad-no-keep", rows.NEURAL, "transformer", "no-keep")


def test_names_are_unique_and_kinds_known():
    assert len(set(rows.names(rows.ROWS))) == len(rows.ROWS)
    assert len(set(rows.names(rows.EXPORT_VARIANTS))) == len(rows.EXPORT_VARIANTS)
    assert {row.kind for row in rows.ROWS} == {rows.BASELINE, rows.NEURAL}
    assert {v.source for v in rows.EXPORT_VARIANTS} == {rows.RAW, rows.STAGE1, rows.STAGE2, rows.MINILM,
                                                        rows.ATTRIBUTES}
    assert set(rows.TOWER_SOURCES) == {rows.RAW, rows.STAGE1, rows.STAGE2}


def test_every_neural_row_has_a_known_encoder_and_export():
    for row in rows.neural():
        assert row.encoder in session_encoders.ENCODERS, row
        if row.export is not None:
            rows.export_variant(row.export)  # raises for a name the registry does not hold


def test_every_baseline_row_but_the_oracle_is_made_by_eval_baselines_or_reads_an_export():
    config = tpad_base.get_config("tiny")
    for row in rows.baselines():
        assert row.encoder is None
        if row.export is not None:  # a content item-kNN row
            rows.export_variant(row.export)
        elif row.name != rows.ORACLE:
            assert hasattr(baselines.make_baseline(row.name, config), "fit")
    # The `baselines` group of --models is the session baselines: it needs no export stage.
    assert set(rows.names(rows.session_baselines())) == {"oracle", "pop", "s-pop", "markov", "sknn"}
    assert rows.names(rows.needed_exports(["minilm-knn", "tpad-knn"])) == ("tpad", "minilm")


def test_stage2_overrides_are_stage2_keys_of_the_config():
    config = tpad_base.get_config()
    for variant in rows.stage2_variants():
        assert set(variant.stage2_overrides) <= set(config.stage2.keys()), variant
        changed = stages.stage2_config(config, variant.name).stage2
        assert all(changed[key] == value for key, value in variant.stage2_overrides.items())
    assert not [v for v in rows.EXPORT_VARIANTS if v.source != rows.STAGE2 and v.stage2_overrides]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_configured_row_is_known(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    for row in evaluate.configured_models(config):
        rows.get(row)
    assert sorted(config.msbr.per_model.keys()) == sorted(rows.names(rows.neural()))


def test_the_default_rows_are_the_registry_in_report_order():
    assert tpad_base.get_config().eval.models == rows.names(rows.defaults())
    # The default run: the method, the baselines and the three rows that say whether it pays.
    assert rows.names(rows.defaults()) == ("oracle", "pop", "s-pop", "markov", "sknn", "transformer",
                                           "transformer+raw", "transformer+stage1", "tpad")
    # The full table adds every ablation and encoder; the test preset runs all of them.
    full = tpad_base.get_config("full").eval.models
    assert full == tpad_base.get_config("tiny").eval.models == rows.names(rows.full_table())
    assert {"tpad-knn", "tpad-no-gen", "tpad-no-disentangle", "tpad-no-align", "gru4rec", "srgnn",
            "srgnn+tpad"} == (
        set(full) - set(rows.names(rows.defaults())))
    assert tpad_base.get_config("full").msbr.per_model == tpad_base.get_config().msbr.per_model
    assert rows.names(rows.ROWS)[:5] == ("oracle", "pop", "s-pop", "markov", "sknn")


def test_lookups_name_what_is_known():
    assert rows.get("tpad") == rows.Row("tpad", rows.NEURAL, "transformer", rows.MAIN_VARIANT)
    with pytest.raises(UserError, match=r"unknown model 'bert4rec'; known: oracle, pop, "):
        rows.get("bert4rec")
    with pytest.raises(UserError, match=r"unknown neural model 'pop'; known: gru4rec, "):
        rows.neural_row("pop")
    assert rows.export_of("srgnn+tpad") == rows.MAIN_VARIANT
    assert rows.export_of("gru4rec") is None and rows.export_of("pop") is None and rows.export_of("x") is None


def test_needed_exports_follow_the_rows():
    assert rows.needed_exports(["pop", "gru4rec"]) == ()
    assert rows.names(rows.needed_exports(["tpad-no-align", "transformer+raw", "srgnn+tpad", "tpad"])) == (
        "raw", "tpad", "no-align")
    assert rows.names(rows.needed_exports(["transformer+minilm"])) == ("minilm",)
    assert rows.names(rows.needed_exports(["transformer+attributes", "tpad"])) == ("tpad", "attributes")
    # A row fused with another export's kNN needs that export too.
    assert rows.names(rows.needed_exports(["transformer+minilm+tpad-knn"])) == ("tpad", "minilm")
    assert rows.knn_export_of("transformer+minilm+tpad-knn") == "tpad"
    assert rows.knn_export_of("transformer+minilm") == "minilm" and rows.knn_export_of("transformer") is None
    assert rows.names(rows.needed_exports(["transformer+stage1+tpad-knn"])) == ("stage1", "tpad")
    # Each ranks the trained model of the row with its features and no kNN of its own.
    assert rows.trained_row("transformer+stage1+tpad-knn") == "transformer+stage1"
    assert rows.trained_row("transformer+minilm+tpad-knn") == "transformer+minilm"
    assert rows.trained_row("tpad") == "tpad"


def test_every_export_and_stage_has_its_own_directory():
    assert layout.export_name(rows.MAIN_VARIANT) == "export" and layout.stage_name(rows.MAIN_VARIANT) == "stage2"
    assert layout.export_name("no-gen") == "export_no-gen" and layout.stage_name("no-gen") == "stage2_no-gen"
    assert layout.stage_name(rows.STAGE1) == "stage1"
    assert layout.stage_name(rows.RAW) is None and layout.stage_name(rows.MINILM) is None
    exports = [layout.export_name(v.name) for v in rows.EXPORT_VARIANTS]
    stage_dirs = [layout.stage_name(v.name) for v in rows.EXPORT_VARIANTS if layout.stage_name(v.name)]
    assert len(set(exports)) == len(exports) and all(map(layout.is_export_name, exports))
    assert len(set(stage_dirs)) == len(stage_dirs) and all(map(layout.is_stage_name, stage_dirs))


def test_one_more_ablation_is_one_variant_and_one_row(monkeypatch):
    monkeypatch.setattr(rows, "EXPORT_VARIANTS", rows.EXPORT_VARIANTS + (NO_KEEP,))
    monkeypatch.setattr(rows, "ROWS", rows.ROWS + (NO_KEEP_ROW,))
    config = tpad_base.get_config("tiny")
    assert "tpad-no-keep" in config.eval.models and "tpad-no-keep" in config.msbr.per_model
    assert "tpad-no-keep" in evaluate.expand_models("all", config)
    assert "no-keep" in rows.names(rows.needed_exports(evaluate.configured_models(config)))
    assert stages.stage2_config(config, "no-keep").stage2.keep_weight == 0.0
    assert layout.stage_name("no-keep") == "stage2_no-keep" and layout.export_name("no-keep") == "export_no-keep"
    record = provenance.export_record(config, "fingerprint", "no-keep")
    assert record["config"]["stage2.keep_weight"] == 0.0
    assert settings.encoder_config("tpad-no-keep", config).encoder == "transformer"
