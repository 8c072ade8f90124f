"""`msbr.knn_fusion`: a trained content row ranked with its export's item-kNN added to its scores,
score(v) + w x cos(e[last click], e[v]), the weight chosen on validation `msbr.knn_fusion_metric`.
References: the dense [n, N] score matrix of the row plus the cosine term, ranked by `metrics.ranks_from_scores`."""

import copy
import json
import os
import re
import shutil

import numpy as np
import pytest
from flax import nnx

from configs import tpad_base
from tpad_jax import export, layout, new_items, provenance, runner
from tpad_jax import recommender as recommender_lib
from tpad_jax.cli import UserError
from tpad_jax.data import readonly
from tpad_jax.downstream import features as features_lib
from tpad_jax.downstream import scoring, selection, serving, tables, training
from tpad_jax.eval import metrics


def dense_fused_ranks(model, config, prefixes, targets, unit, weight):
    """Ranks read off the full score matrix of the row plus weight x cos(last click, v)."""
    width = tables.prefix_width(config)
    scores = np.concatenate([np.asarray(scoring.prefix_scorer(model, width, 64)(prefixes[start:start + 64]))
                             for start in range(0, len(prefixes), 64)])
    last = np.array([prefix[-1] for prefix in prefixes])
    return np.asarray(metrics.ranks_from_scores(scores + weight * unit[last] @ unit.T, np.asarray(targets)))


@pytest.fixture(scope="module")
def tpad_row(tiny_run):
    config, workdir = tiny_run
    data = readonly.load(config, workdir)
    model = serving.load_selected("tpad", config, workdir, data)
    unit = features_lib.normalise_content(features_lib.load_features(workdir, "tpad", data), "l2")
    return config, workdir, data, model, unit


@pytest.mark.parametrize("weight", [0.0, 2.5])
def test_fused_ranks_equal_the_dense_scores_plus_the_cosine(tpad_row, weight):
    config, _, data, model, unit = tpad_row
    prefixes, targets = data.examples("valid")
    fused = scoring.rank_examples(model, prefixes, targets, tables.prefix_width(config), 16, (2,),
                                  knn=(unit, weight))
    np.testing.assert_array_equal(fused, dense_fused_ranks(model, config, prefixes, targets, unit, weight))


@pytest.mark.parametrize("metric", [("MRR", 20), ("HR", 5)])
def test_the_weight_of_best_validation_metric_ranks_the_test_split(tpad_row, capsys, metric):
    config, workdir, data, model, unit = tpad_row
    config = copy.deepcopy(config)
    config.msbr.knn_fusion = ("0,1,50",)  # as the command line gives it
    if metric != ("MRR", 20):  # the default
        config.msbr.knn_fusion_metric = f"{metric[0].lower()}@{metric[1]}"
    prefixes, targets = data.examples("valid")
    valid = {w: metrics.metrics_from_ranks(dense_fused_ranks(model, config, prefixes, targets, unit, w),
                                           (metric[1],))[metric] for w in (0.0, 1.0, 50.0)}
    best = max(valid.values())
    expected = min(w for w, value in valid.items() if value == best)
    got_unit, got = training.chosen_knn("tpad", model, config, workdir, data)
    label = f"{metric[0]}@{metric[1]}"
    assert got == expected and f"kNN fusion weight {expected:g} chosen on validation {label}" in \
        capsys.readouterr().out
    stored = selection.read_fusion(layout.row_dir(workdir, "tpad"))
    assert stored["metric"] == label and stored["valid"] == [valid[w] for w in (0.0, 1.0, 50.0)]
    np.testing.assert_array_equal(got_unit, unit)
    test_prefixes, test_targets = data.examples("test")
    np.testing.assert_array_equal(
        training.evaluate_neural("tpad", config, workdir, data),
        dense_fused_ranks(model, config, test_prefixes, test_targets, unit, expected))


def test_fusion_is_off_by_default_and_for_rows_without_an_export(tpad_row):
    config, workdir, data, model, _ = tpad_row
    assert training.chosen_knn("tpad", model, config, workdir, data) is None
    fused = copy.deepcopy(config)
    fused.msbr.knn_fusion = (1.0,)
    assert training.chosen_knn("transformer", model, fused, workdir, data) is None


def test_weights_tie_to_the_smaller_and_bad_ones_are_named():
    assert scoring.choose_weight({4.0: 3.0, 1.0: 3.0, 0.0: 2.0}) == 1.0
    config = tpad_base.get_config("tiny")
    config.msbr.knn_fusion = ("0,x",)
    with pytest.raises(UserError, match=r"^msbr.knn_fusion: 'x' is not a number; give weights like 0,4,16$"):
        scoring.fusion_weights(config)
    for bad in ("recall@20", "HR@0", "HR", "HR@x"):
        config.msbr.knn_fusion_metric = bad
        with pytest.raises(UserError, match=rf"^msbr.knn_fusion_metric: '{bad}' is not a metric like HR@20; "
                                            r"choose HR, MRR, NDCG at a cut-off$"):
            scoring.fusion_metric(config)


SERVED_WEIGHT = 2.5


@pytest.fixture
def fused_run(tpad_row):
    """The tiny run's tpad row with a knn_fusion.json that chose SERVED_WEIGHT among (0, SERVED_WEIGHT), as
    evaluation writes it; removed afterwards (the shared run's default config has fusion off)."""
    config, workdir, data, model, unit = tpad_row
    fused = copy.deepcopy(config)
    fused.msbr.knn_fusion = (0.0, SERVED_WEIGHT)
    directory = layout.row_dir(workdir, "tpad")
    selection.write_fusion(directory, {0.0: 1.0, SERVED_WEIGHT: 2.0}, SERVED_WEIGHT,
                           selection.inputs_record("tpad", fused, workdir, data), "MRR@20")
    yield fused, workdir, data, model, unit
    os.remove(os.path.join(directory, layout.FUSION_FILE))


def test_serving_a_fused_row_scores_as_evaluation_ranked_it(fused_run):
    config, workdir, data, model, unit = fused_run
    recommender = recommender_lib.Recommender.from_workdir(workdir, "tpad", config=config, batch_size=8)
    prefixes, _ = data.examples("valid")
    prefixes = prefixes[:12]  # two calls of the compiled scorer, the second padded
    width = tables.prefix_width(config)
    expected = (np.asarray(scoring.prefix_scorer(model, width, 16)(prefixes))
                + SERVED_WEIGHT * unit[[prefix[-1] for prefix in prefixes]] @ unit.T)
    sessions = [[data.item_ids[row] for row in prefix] for prefix in prefixes]
    for result, scores in zip(recommender.recommend(sessions, k=10, exclude_seen=False), expected):
        got = result["recommendations"]
        assert [data.item_ids.index(r["item_id"]) for r in got] == np.argsort(-scores, kind="stable")[:10].tolist()
        np.testing.assert_allclose([r["score"] for r in got], np.sort(scores)[::-1][:10], rtol=1e-5, atol=1e-5)


def test_a_new_item_served_fused_gains_the_cosine_to_the_last_click(fused_run, tmp_path):
    config, workdir, data, _, unit = fused_run
    source = tmp_path / "items.jsonl"  # a new id with item 0's title and no image
    source.write_text(json.dumps({"item_id": "new-twin", "title": data.titles[0], "category": data.categories[0]})
                      + "\n", encoding="utf-8")
    out_dir = str(tmp_path / "export")
    new_items.embed_new_items(config, workdir, str(source), out_dir)
    new_unit = features_lib.normalise_content(export.load_export(out_dir)[0], "l2")[0]
    session = [data.item_ids[3]]
    served = {}
    for name, weights in (("fused", config.msbr.knn_fusion), ("plain", ())):
        run_config = copy.deepcopy(config)
        run_config.msbr.knn_fusion = weights
        recommender = recommender_lib.Recommender.from_workdir(workdir, "tpad", config=run_config)
        recommender.add_items(out_dir)
        ranked = recommender.recommend([session], k=recommender.num_items, exclude_seen=False)[0]
        served[name] = {r["item_id"]: r["score"] for r in ranked["recommendations"]}
    for item_id, row in (("new-twin", None), (data.item_ids[5], 5)):
        cosine = float(unit[3] @ (new_unit if row is None else unit[row]))
        assert served["fused"][item_id] - served["plain"][item_id] == pytest.approx(SERVED_WEIGHT * cosine,
                                                                                    abs=1e-4)


@pytest.mark.parametrize("case", ["missing", "other weights", "other metric", "other inputs"])
def test_serving_without_the_weight_evaluation_chose_is_refused_in_one_line(fused_run, case):
    config, workdir, _, _, _ = fused_run
    path = os.path.join(layout.row_dir(workdir, "tpad"), layout.FUSION_FILE)
    config = copy.deepcopy(config)
    if case == "missing":
        os.rename(path, path + ".away")
        refusal = rf"^{re.escape(path)}: missing; msbr.knn_fusion=0,2.5 needs the weight chosen on validation"
    elif case == "other weights":
        config.msbr.knn_fusion = ("0,4",)
        refusal = rf"^{re.escape(path)}: the weight was chosen among 0,2.5, not msbr.knn_fusion=0,4 "
    elif case == "other metric":
        config.msbr.knn_fusion_metric = "HR@20"
        refusal = (rf"^{re.escape(path)}: the weight was chosen on validation MRR@20, "
                   r"not msbr.knn_fusion_metric=HR@20 ")
    else:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        stored["inputs"]["data_fingerprint"] = "0" * 64  # as another catalogue gives
        with open(path, "w", encoding="utf-8") as f:
            json.dump(stored, f)
        refusal = rf"^{re.escape(path)}: chosen for a model trained on other inputs "
    try:
        with pytest.raises(UserError, match=refusal + r".*launch/evaluate.py --models=tpad chooses it"):
            recommender_lib.Recommender.from_workdir(workdir, "tpad", config=config)
    finally:
        if case == "missing":
            os.rename(path + ".away", path)


# Rows with TPAD's e_K as the kNN term (`rows.Row.knn`) and another export's features: (row, its features'
# export, the row whose trained model it ranks).
KNN_ROWS = (("transformer+minilm+tpad-knn", "minilm", "transformer+minilm"),
            ("transformer+stage1+tpad-knn", "stage1", "transformer+stage1"))


@pytest.fixture(scope="module", params=KNN_ROWS, ids=[row for row, _, _ in KNN_ROWS])
def other_knn_run(tiny_run, tmp_path_factory, request):
    """A copy of the tiny run with one of KNN_ROWS evaluated under fusion (weights 0, 2.5, 50)."""
    knn_row, features_export, trained = request.param
    config, shared = tiny_run
    workdir = str(tmp_path_factory.mktemp("other_knn") / "run")
    shutil.copytree(shared, workdir, symlinks=True)  # the shared run is read by other test processes
    config = copy.deepcopy(config)
    config.eval.models = (knn_row,)
    config.msbr.knn_fusion = (0.0, 2.5, 50.0)
    runner.run(config, workdir)
    data = readonly.load(config, workdir)
    model = serving.load_selected(knn_row, config, workdir, data)
    tpad_unit = features_lib.normalise_content(features_lib.load_features(workdir, "tpad", data), "l2")
    return config, workdir, data, model, tpad_unit, (knn_row, features_export, trained)


def test_a_row_fused_with_another_exports_knn_chooses_and_serves_with_that_export(other_knn_run):
    config, workdir, data, model, tpad_unit, (knn_row, _, trained) = other_knn_run
    prefixes, targets = data.examples("valid")
    valid = {w: metrics.metrics_from_ranks(dense_fused_ranks(model, config, prefixes, targets, tpad_unit, w),
                                           (20,))[("MRR", 20)] for w in (0.0, 2.5, 50.0)}
    # It ranks the trained model of the row with its features, which it does not train again.
    assert not os.path.exists(layout.best_params_file(workdir, knn_row))
    np.testing.assert_array_equal(np.asarray(model.item_table()),
                                  np.asarray(serving.load_selected(trained, config, workdir, data).item_table()))
    stored = selection.read_fusion(layout.row_dir(workdir, knn_row))
    np.testing.assert_allclose(stored["valid"], [valid[w] for w in (0.0, 2.5, 50.0)])
    assert stored["inputs"]["knn_export"] == provenance.export_id(layout.export_dir(workdir, "tpad"),
                                                                 data.fingerprint)
    # Served fused with TPAD's cosine at the stored weight (forced to 2.5 so the term is not zero).
    selection.write_fusion(layout.row_dir(workdir, knn_row), valid, 2.5, stored["inputs"], "MRR@20")
    recommender = recommender_lib.Recommender.from_workdir(workdir, knn_row, config=config, batch_size=8)
    prefixes = prefixes[:8]
    expected = (np.asarray(scoring.prefix_scorer(model, tables.prefix_width(config), 8)(prefixes))
                + 2.5 * tpad_unit[[prefix[-1] for prefix in prefixes]] @ tpad_unit.T)
    sessions = [[data.item_ids[row] for row in prefix] for prefix in prefixes]
    for result, scores in zip(recommender.recommend(sessions, k=10, exclude_seen=False), expected):
        got = [data.item_ids.index(r["item_id"]) for r in result["recommendations"]]
        assert got == np.argsort(-scores, kind="stable")[:10].tolist()


def test_a_new_item_of_a_row_fused_with_another_export_is_embedded_for_both(other_knn_run, tmp_path):
    """A new item of the row gets its features' embedding (MiniLM's, or stage 1's K's) and TPAD's e_K for
    the kNN term: a twin of catalogue item 0 (same title, category and image) scores as item 0 does
    without its ID part."""
    config, workdir, data, model, tpad_unit, (knn_row, features_export, _) = other_knn_run
    stored = selection.read_fusion(layout.row_dir(workdir, knn_row))
    selection.write_fusion(layout.row_dir(workdir, knn_row), dict(zip((0.0, 2.5, 50.0), stored["valid"])), 2.5,
                           stored["inputs"], "MRR@20")  # a weight whose term is not zero
    os.makedirs(tmp_path / "images")
    shutil.copy(data.image_paths[0], tmp_path / "images")
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps({"item_id": "new-twin", "title": data.titles[0], "category": data.categories[0],
                                  "image": f"images/{os.path.basename(data.image_paths[0])}"}) + "\n",
                      encoding="utf-8")
    recommender = recommender_lib.Recommender.from_workdir(workdir, knn_row, config=config, batch_size=8)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: a directory of new items holds one "
                                        r"export's embeddings, but .* reads two "
                                        rf"\(features {features_export}, kNN term tpad\)"):
        recommender.add_items(str(tmp_path))
    assert recommender.add_items(str(source)) == ["new-twin"]
    ranked = recommender.recommend([[data.item_ids[3]]], k=recommender.num_items, exclude_seen=False)[0]
    scores = {r["item_id"]: r["score"] for r in ranked["recommendations"]}
    view = nnx.view(recommender._model, deterministic=True)  # noqa: SLF001  (its session vector, ID table)
    items, mask = tables.pad_prefixes([np.array([3], np.int32)], tables.prefix_width(config))
    id_part = float(np.asarray(view(items, mask))[0] @ np.asarray(view.id_embedding.embedding[...])[0])
    assert scores["new-twin"] == pytest.approx(scores[data.item_ids[0]] - id_part, abs=1e-4)
    # The kNN term read the twin's e_K: under the features' own cosine the twin would score otherwise.
    own = features_lib.normalise_content(features_lib.load_features(workdir, features_export, data), "l2")
    assert abs(2.5 * (own[3] @ own[0] - tpad_unit[3] @ tpad_unit[0])) > 1e-3
