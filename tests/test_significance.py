"""Seed tables and paired significance tests against hand-computed values and the normal approximation."""

import math
import os

import numpy as np
import pytest

from tpad_jax.eval import significance


def test_per_example_metrics_at_20_from_ranks():
    ranks = np.array([0, 4, 19, 20, 100])
    assert significance.per_example(ranks, "HR").tolist() == [1, 1, 1, 0, 0]
    np.testing.assert_allclose(significance.per_example(ranks, "MRR"), [1.0, 0.2, 0.05, 0.0, 0.0])


def test_paired_bootstrap_of_identical_rows_is_one():
    a = np.random.default_rng(0).random(300)
    assert significance.paired_bootstrap(a, a.copy(), num_resamples=500) == 1.0


@pytest.mark.parametrize("shift", [0.02, 0.05, 0.1])
def test_paired_bootstrap_agrees_with_the_normal_approximation(shift):
    # 2,000 paired examples: the mean difference is close to normal with standard error sd / sqrt(n).
    rng = np.random.default_rng(1)
    b = rng.random(2000)
    a = b + shift + rng.normal(0.0, 1.0, 2000)
    diff = a - b
    z = abs(diff.mean()) / (diff.std(ddof=1) / math.sqrt(diff.size))
    expected = math.erfc(z / math.sqrt(2.0))  # two-sided normal p-value
    p = significance.paired_bootstrap(a, b, num_resamples=20000, seed=3)
    assert abs(p - expected) < 0.02 + 0.1 * expected


def test_seed_table_means_spreads_and_tests_against_the_reference():
    cold = np.array([True, False, False, False])
    runs = [{"tpad": np.array([0, 0, 30, 1]), "pop": np.array([30, 0, 30, 30])},
            {"tpad": np.array([0, 30, 0, 1]), "pop": np.array([30, 30, 30, 0])}]
    table = significance.seed_table(runs, cold, num_resamples=2000)
    hr = table["tpad"][("all", "HR")]
    assert hr["values"] == [75.0, 75.0] and hr["std"] == 0.0 and hr["p"] is None
    pop = table["pop"][("all", "HR")]
    assert pop["values"] == [25.0, 25.0]
    assert pop["diff"] == pytest.approx(50.0)  # seed-averaged hits: tpad (1, .5, .5, 1), pop (0, .5, 0, .5)
    mrr = table["tpad"][("all", "MRR")]
    assert mrr["values"] == pytest.approx([100 * (1 + 1 + 0 + 0.5) / 4, 100 * (1 + 0 + 1 + 0.5) / 4])
    assert table["pop"][("cold", "HR")]["mean"] == 0.0 and table["tpad"][("cold", "HR")]["mean"] == 100.0
    text = significance.markdown(table, [0, 1])
    assert "| pop | 25.00 +- 0.00 (+50.00, p=" in text


@pytest.mark.parametrize("diffs, expected", [
    ([1.0, 2.0, 3.0], 2 / 8),  # sums +-1 +-2 +-3: only 6 and -6 reach |6|
    ([3.0, -1.0, 1.0, 1.0], 8 / 16),  # +3 + {3,1,1,1,-1,-1,-1,-3}: 6,4,4,4 reach 4; mirrored for -3
    ([0.5] * 6, 2 / 64),  # six equal leads: the smallest p-value six seeds allow
    ([0.0, 0.0], 1.0),
])
def test_sign_flip_test_counts_the_sign_patterns_by_hand(diffs, expected):
    assert significance.sign_flip_test(diffs) == pytest.approx(expected)


def test_sign_flip_test_refuses_what_it_cannot_enumerate():
    with pytest.raises(ValueError, match="1 to 20 differences"):
        significance.sign_flip_test([])


def test_nested_table_averages_downstream_seeds_and_tests_over_pipeline_seeds(tmp_path):
    cold = np.array([True, False])
    runs_of = {7: [{"tpad": np.array([0, 30]), "pop": np.array([30, 30])},    # HR: tpad 50, pop 0
                   {"tpad": np.array([0, 0]), "pop": np.array([30, 0])}],     # tpad 100, pop 50
               8: [{"tpad": np.array([30, 0]), "pop": np.array([0, 30])},     # tpad 50, pop 50
                   {"tpad": np.array([0, 0]), "pop": np.array([30, 30]), "markov": np.array([0, 0])}]}
    table = significance.nested_table(runs_of, cold, num_resamples=2000)
    assert set(table) == {"tpad", "pop"}  # markov ranked in one run only
    tpad, pop = table["tpad"][("all", "HR")], table["pop"][("all", "HR")]
    assert tpad["values"] == [75.0, 75.0] and tpad["std"] == 0.0 and tpad["p"] is None
    assert tpad["within"] == pytest.approx(math.sqrt(2) * 25.0)  # std of (50, 100) with ddof=1
    assert pop["values"] == [25.0, 25.0] and pop["within"] == pytest.approx(math.sqrt(2) * 25.0)
    # Every run averaged per example: tpad hits (.75, .75), pop (.25, .25): a lead of 50 points.
    assert pop["diff"] == pytest.approx(50.0) and pop["seed_diffs"] == [50.0, 50.0]
    assert pop["seed_p"] == pytest.approx(0.5)  # 2 of the 4 sign patterns of (50, 50) reach |50|
    cold_pop = table["pop"][("cold", "HR")]  # example 0: tpad hits 1,1 | 0,1; pop 0,0 | 1,0
    assert table["tpad"][("cold", "HR")]["values"] == [100.0, 50.0] and cold_pop["values"] == [0.0, 50.0]
    assert cold_pop["seed_diffs"] == [100.0, 0.0] and cold_pop["seed_p"] == 1.0
    text = significance.nested_markdown(table, runs_of)
    assert "Pipeline seeds 7, 8, each with 2 downstream seeds" in text
    assert "| pop | 25.00 +- 0.00 (w 35.36) (+50.00, p=" in text and "; 2/2, p=0.500) |" in text
    assert "| tpad | 75.00 +- 0.00 (w 35.36) |" in text
    significance.write_nested(table, runs_of, text, str(tmp_path))
    assert (tmp_path / "pipeline_downstream_seeds.md").read_text() == text
    lines = (tmp_path / "pipeline_downstream_seeds.csv").read_text().splitlines()
    assert lines[0] == ("model,slice,metric,k,seed,downstream_seeds,value,within_std,diff_vs_reference,"
                        "p_sessions,p_seeds")
    assert lines[1:3] == ["tpad,all,HR,20,7,2,75.00,35.36,,,", "tpad,all,HR,20,8,2,75.00,35.36,,,"]
    pop_cold = [line for line in lines if line.startswith("pop,cold,HR")]
    assert [line.split(",")[6] for line in pop_cold] == ["0.00", "50.00"]
    assert pop_cold[0].endswith(",1.0000") and len(lines) == 1 + 2 * 3 * 2  # models x columns x seeds


def test_write_table_writes_the_text_one_csv_line_per_seed_and_the_bars(tmp_path):
    cold = np.array([True, False])
    runs = [{"tpad": np.array([0, 30]), "pop": np.array([30, 30])},
            {"tpad": np.array([0, 0]), "pop": np.array([30, 1])}]
    table = significance.seed_table(runs, cold, num_resamples=200)
    significance.write_table(table, [3, 4], "the text\n", str(tmp_path))
    assert (tmp_path / "pipeline_seeds.md").read_text() == "the text\n"
    lines = (tmp_path / "pipeline_seeds.csv").read_text().splitlines()
    assert lines[0] == "model,slice,metric,k,seed,value,diff_vs_reference,p_value"
    # tpad HR@20 over both examples: seed 3 hits 1 of 2, seed 4 hits 2 of 2; it is the reference (no p).
    assert lines[1:3] == ["tpad,all,HR,20,3,50.00,,", "tpad,all,HR,20,4,100.00,,"]
    assert len(lines) == 1 + 2 * 3 * 2  # models x columns x seeds
    assert (tmp_path / "pipeline_seeds.png").stat().st_size > 0


def test_probe_table_means_and_spreads_of_every_export_in_every_seed():
    def rows(model, hr, mrr, cold):
        return [{"model": model, "slice": "all", "metric": "HR", "k": 20, "value": hr},
                {"model": model, "slice": "all", "metric": "MRR", "k": 20, "value": mrr},
                {"model": model, "slice": "all", "metric": "NDCG", "k": 20, "value": 99.0},  # not a column
                {"model": model, "slice": "cold", "metric": "HR", "k": 20, "value": cold}]

    seed0 = rows("probe:tpad", 10.0, 3.0, 12.0) + rows("probe:raw", 7.0, 2.0, 9.0)
    seed1 = rows("probe:tpad", 12.0, 4.0, 14.0)  # raw missing: left out
    text = significance.probe_markdown([seed0, seed1], [0, 1])
    # mean 11, std with ddof=1: sqrt(((10-11)^2 + (12-11)^2) / 1) = 1.41; 3.5 +- 0.71; 13 +- 1.41.
    assert "| probe:tpad | 11.00 +- 1.41 | 3.50 +- 0.71 | 13.00 +- 1.41 |" in text
    assert "probe:raw" not in text and "99" not in text


def test_fusion_line_names_the_weight_each_row_chose_in_each_seed(tmp_path):
    from tpad_jax import layout  # noqa: PLC0415
    from tpad_jax.downstream import selection  # noqa: PLC0415

    written = {0: {"tpad": 16.0, "transformer+minilm": 4.0}, 1: {"tpad": 0.5}}
    for seed, chosen in written.items():
        for name, weight in chosen.items():
            directory = layout.row_dir(str(tmp_path / f"seed{seed}"), name)
            os.makedirs(directory)
            offered = {0.0: 1.0, 0.5: 1.5, 4.0: 1.0, 16.0: 2.0}
            selection.write_fusion(directory, {w: 2.0 if w == weight else 1.0 for w in offered}, weight,
                                   {"data_fingerprint": "x"}, "HR@20")
    stale = layout.row_dir(str(tmp_path / "seed1"), "transformer+minilm")  # chosen among other weights
    os.makedirs(stale)
    selection.write_fusion(stale, {0.0: 1.0, 2.0: 2.0}, 2.0, {"data_fingerprint": "x"}, "HR@20")
    other_metric = layout.row_dir(str(tmp_path / "seed1"), "transformer+stage1")  # the same weights, by MRR@20
    os.makedirs(other_metric)
    selection.write_fusion(other_metric, {0.0: 1.0, 0.5: 1.0, 4.0: 2.0, 16.0: 1.0}, 4.0, {"data_fingerprint": "x"},
                           "MRR@20")
    read = {seed: selection.chosen_fusion(str(tmp_path / f"seed{seed}"), ["transformer", "tpad",
                                                                            "transformer+minilm",
                                                                            "transformer+stage1"],
                                          (0.0, 0.5, 4.0, 16.0), "HR@20")
            for seed in (0, 1)}
    assert read == written
    assert significance.fusion_markdown(read, [0, 1], "HR@20") == (
        "kNN fusion weight chosen on validation HR@20 (msbr.knn_fusion), seeds 0, 1: tpad 16, 0.5; "
        "transformer+minilm 4, –.\n")
