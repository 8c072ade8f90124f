"""The report's figures draw the values they are given: bar heights, labels, error bars, y-ranges."""

import numpy as np
import pytest
from PIL import Image

from tpad_jax.eval import plots


def _rows(values):
    return [{"model": m, "slice": s, "metric": "HR", "k": 20, "value": v} for (m, s), v in values.items()]


def test_bar_chart_draws_each_value_with_its_label_and_error(tmp_path):
    values = {("pop", "all"): 10.0, ("pop", "cold"): 2.5, ("tpad", "all"): 61.25, ("tpad", "cold"): 22.75}
    out = tmp_path / "hr20.png"
    fig = plots.bar_chart(_rows(values) + [{"model": "tpad", "slice": "all", "metric": "MRR", "k": 20,
                                            "value": 99.0}], "HR", 20, str(out),
                          errors={("tpad", "all"): 1.5})
    assert Image.open(out).size[0] > 0
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 4) for p in ax.patches)
    assert heights == [2.5, 10.0, 22.75, 61.25]  # the MRR row is not drawn; no warm bars (no warm values)
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(["10.0", "2.5", "61.2±1.5", "22.8"])  # hand-formatted: one decimal
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 61.25 + 1.5
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pop", "tpad"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["all", "cold"]


def test_seed_bars_show_mean_std_and_mark_significant_rows(tmp_path):
    cell = lambda mean, std, p: {"mean": mean, "std": std, "p": p, "values": [], "diff": None}  # noqa: E731
    table = {"tpad": {("all", "HR"): cell(60.0, 0.5, None), ("cold", "HR"): cell(22.0, 1.0, None)},
             "markov": {("all", "HR"): cell(47.0, 0.0, 0.001), ("cold", "HR"): cell(11.0, 0.0, 0.2)}}
    fig = plots.seed_bars(table, [0, 1, 2], str(tmp_path / "seeds.png"))
    all_ax, cold_ax = fig.axes
    assert [p.get_height() for p in all_ax.patches] == [60.0, 47.0]
    assert [t.get_text() for t in all_ax.texts] == ["60.0±0.5", "47.0±0.0*"]
    assert [t.get_text() for t in cold_ax.texts] == ["22.0±1.0", "11.0±0.0"]  # p = 0.2: no mark
    assert all_ax.get_title() == "HR@20 (all)" and cold_ax.get_title() == "HR@20 (cold)"


def test_moving_average_by_hand():
    np.testing.assert_allclose(plots.moving_average([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(plots.moving_average([4.0, 2.0], 1), [4.0, 2.0])


def test_loss_curves_plot_every_term_and_keep_the_first_spike_out_of_the_range(tmp_path):
    steps = range(10, 1010, 10)
    stage1 = [{"step": s, "time": 0.0, "loss": 100.0 if s == 10 else 3.0 - s / 1000, "caption_ce": 2.0,
               "text_view_infonce": 1.0, "text_view_acc": 0.5, "grad_norm": 9.0} for s in steps]
    stage1.insert(5, {"step": 55, "eval/probe_mrr20": 14.0})  # evaluation records are not loss terms
    stage2 = [{"step": s, "loss": 5.0, "critic_nll": -0.5, "mmd": 0.1} for s in steps]
    fig = plots.loss_curves({"stage1": stage1, "stage2": stage2}, str(tmp_path / "curves.png"))
    first, second = fig.axes
    legend = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]  # noqa: E731
    assert legend(first) == ["loss", "caption_ce", "text_view_infonce"]
    assert legend(second) == ["loss", "critic_nll", "mmd"]
    low, high = first.get_ylim()
    assert high < 10.0 and low < 1.0  # the step-10 spike of 100 is drawn but does not set the range
    assert second.get_ylim()[0] < -0.5 and second.get_ylim()[1] > 5.0
    assert first.get_title() == "stage1"


def test_validation_curves_mark_the_selected_epoch(tmp_path):
    probe = {"stage1": [{"step": 100, "eval/probe_mrr20": 13.0}, {"step": 50, "loss": 1.0},
                        {"step": 200, "eval/probe_mrr20": 14.5}]}
    histories = {"tpad": {"history": {"1": 20.0, "2": 23.5, "10": 22.0}, "best_epoch": 2},
                 "gru4rec": {"history": {}, "best_epoch": None}}
    fig = plots.validation_curves(probe, histories, str(tmp_path / "valid.png"))
    probe_ax, row_ax = fig.axes
    (probe_line,) = probe_ax.get_lines()
    assert list(probe_line.get_xdata()) == [100, 200] and list(probe_line.get_ydata()) == [13.0, 14.5]
    curve, star = row_ax.get_lines()
    assert list(curve.get_xdata()) == [1, 2, 10]  # epochs in number order, not string order
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [23.5]


@pytest.mark.parametrize("empty", [{}, {"stage1": []}])
def test_loss_curves_of_nothing_still_write_a_figure(tmp_path, empty):
    plots.loss_curves(empty, str(tmp_path / "none.png"))
    assert (tmp_path / "none.png").stat().st_size > 0
