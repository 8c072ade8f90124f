"""`msbr.knn_fusion`: a trained content row ranked with its export's item-kNN added to its scores,
score(v) + w x cos(e[last click], e[v]), the weight chosen on validation MRR@20. References: the dense
[n, N] score matrix of the row plus the cosine term, ranked by `metrics.ranks_from_scores`."""

import copy

import numpy as np
import pytest

from configs import tpad_base
from tpad_jax import recommender as recommender_lib
from tpad_jax.cli import UserError
from tpad_jax.data import readonly
from tpad_jax.downstream import features as features_lib
from tpad_jax.downstream import scoring, serving, tables, training
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


def test_the_weight_of_best_validation_mrr_ranks_the_test_split(tpad_row, capsys):
    config, workdir, data, model, unit = tpad_row
    config = copy.deepcopy(config)
    config.msbr.knn_fusion = ("0,1,50",)  # as the command line gives it
    prefixes, targets = data.examples("valid")
    mrr = {w: metrics.metrics_from_ranks(dense_fused_ranks(model, config, prefixes, targets, unit, w),
                                         (20,))[("MRR", 20)] for w in (0.0, 1.0, 50.0)}
    best = max(mrr.values())
    expected = min(w for w, value in mrr.items() if value == best)
    got_unit, got = training.chosen_knn("tpad", model, config, workdir, data)
    assert got == expected and f"kNN fusion weight {expected:g} chosen" in capsys.readouterr().out
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


def test_serving_a_fused_row_is_refused_in_one_line(tpad_row):
    config, workdir, _, _, _ = tpad_row
    fused = copy.deepcopy(config)
    fused.msbr.knn_fusion = (0.0, 4.0)
    refusal = r"^tpad: msbr.knn_fusion=0.0,4.0 ranked it fused .* msbr.knn_fusion=\(\)$"
    with pytest.raises(UserError, match=refusal):
        recommender_lib.Recommender.from_workdir(workdir, "tpad", config=fused)
