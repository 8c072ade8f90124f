"""The report's figures: metric bars (with seed error bars), per-term loss curves, validation curves.

Every function takes values already read (result rows, metrics.jsonl records, selection histories), writes
one PNG atomically and returns the figure, so a test can read back what was drawn. Why these choices:
- Bars carry their value as a label: a reader compares rows that differ by a point or less, which no
  one reads off an axis. The y-axis starts at 0 (bar lengths are the values) and leaves room for labels.
- A stage's loss terms share one panel and are smoothed (a moving average over about 2 % of the run, the
  raw curve faint behind it); the y-range covers the smoothed curves after the first 5 % of steps, so
  the first steps' spike does not flatten the rest of the run.
- Validation curves are what selection reads: the probe's MRR@20 per evaluation of each stage, and each
  downstream row's validation MRR@20 per epoch with its selected epoch marked.
"""

import math

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from tpad_jax.workdir import atomic_open  # noqa: E402

SLICES = ("all", "cold", "warm")
LOSS_SUFFIXES = ("_ce", "_infonce", "_mi", "_nll")  # a stage's loss terms, as the models log them (models/tpad.py)
LOSS_NAMES = ("loss", "mmd", "keep", "separation")
PROBE_KEY = "eval/probe_mrr20"
WARMUP_FRACTION = 0.05  # steps left out of the y-range of a loss panel
SMOOTH_FRACTION = 0.02  # moving-average window, as a fraction of the logged points


def _save(fig, out_png: str):
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return fig


def _label(value: float, error: float | None) -> str:
    return f"{value:.1f}" if error is None else f"{value:.1f}±{error:.1f}"


def bar_chart(rows: list[dict], metric: str, k: int, out_png: str, errors: dict | None = None):
    """Grouped bars of metric@k per model, one bar per slice; missing values are left out.

    Args:
      rows: result rows (model, slice, metric, k, value in %), models in report order.
      errors: optional {(model, slice): std over seeds}, drawn as error bars and in the labels.
    """
    errors = errors or {}
    models = list(dict.fromkeys(r["model"] for r in rows))
    values = {(r["model"], r["slice"]): r["value"] for r in rows if r["metric"] == metric and r["k"] == k}
    slices = [s for s in SLICES if any((m, s) in values for m in models)]
    width = 0.8 / max(len(slices), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(models) + 2.0), 4.5))
    top = 0.0
    for offset, slice_name in enumerate(slices):
        shown = [(i, m) for i, m in enumerate(models) if (m, slice_name) in values]
        positions = [i + (offset - (len(slices) - 1) / 2) * width for i, _ in shown]
        heights = [values[(m, slice_name)] for _, m in shown]
        spread = [errors.get((m, slice_name)) for _, m in shown]
        bars = ax.bar(positions, heights, width, label=slice_name,
                      yerr=[0.0 if s is None else s for s in spread] if errors else None, capsize=2)
        ax.bar_label(bars, [_label(h, s) for h, s in zip(heights, spread)], rotation=90, padding=2, fontsize=7)
        top = max([top] + [h + (s or 0.0) for h, s in zip(heights, spread)])
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_ylabel(f"{metric}@{k} (%)")
    ax.set_ylim(0.0, top * 1.18 if top > 0 else 1.0)  # room for the rotated labels
    if slices:  # no values at all: an empty chart says so better than an empty legend
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(slices), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_png)


def seed_bars(table: dict, seeds, out_png: str, reference: str = "tpad"):
    """Mean +- std over whole-pipeline seeds, one panel per column of the seed table.

    Args:
      table: `significance.seed_table`'s {model: {(slice, metric): {"mean", "std", "p", ...}}}.
      seeds: the seeds, for the title.
    A `*` after a label marks a row whose difference from `reference` has p < 0.05.
    """
    models = list(table)
    columns = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, len(columns), figsize=(max(6.0, 0.45 * len(models) + 1.5) * len(columns) / 2,
                                                       4.5), squeeze=False)
    for ax, column in zip(axes[0], columns):
        cells = [table[m][column] for m in models]
        means, stds = [c["mean"] for c in cells], [c["std"] for c in cells]
        colors = ["tab:red" if m == reference else "tab:blue" for m in models]
        bars = ax.bar(range(len(models)), means, 0.7, yerr=stds, capsize=2, color=colors)
        marks = ["*" if c["p"] is not None and c["p"] < 0.05 else "" for c in cells]
        ax.bar_label(bars, [_label(m, s) + mark for m, s, mark in zip(means, stds, marks)], rotation=90,
                     padding=2, fontsize=7)
        ax.set_xticks(range(len(models)), models, rotation=60, ha="right", fontsize=8)
        slice_name, metric = column
        ax.set_title(f"{metric}@20 ({slice_name})", fontsize=9)
        top = max(m + s for m, s in zip(means, stds))
        ax.set_ylim(0.0, top * 1.25 if top > 0 else 1.0)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"whole-pipeline seeds {', '.join(str(s) for s in seeds)}: mean ± std "
                 f"(* p < 0.05 against {reference})", fontsize=9)
    return _save(fig, out_png)


def is_loss_term(key: str) -> bool:
    return key in LOSS_NAMES or key.endswith(LOSS_SUFFIXES)


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (the first points average what exists so far)."""
    values = np.asarray(values, np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_curves(records_of: dict[str, list[dict]], out_png: str):
    """One panel per stage (name -> its metrics.jsonl records), one line per loss term against step."""
    fig, axes = plt.subplots(1, max(len(records_of), 1), figsize=(4.5 * max(len(records_of), 1), 3.6),
                             squeeze=False)
    for ax, (name, records) in zip(axes[0], records_of.items()):
        terms = sorted({key for r in records for key in r if is_loss_term(key)}, key=lambda t: (t != "loss", t))
        low, high = math.inf, -math.inf
        for term in terms:
            points = [(r["step"], r[term]) for r in records if "step" in r and term in r]
            steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points], np.float64)
            smooth = moving_average(values, max(1, round(SMOOTH_FRACTION * len(values))))
            line, = ax.plot(steps, smooth, label=term, linewidth=1.4 if term == "loss" else 1.0)
            ax.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.6)
            kept = smooth[int(WARMUP_FRACTION * len(smooth)):] if len(smooth) > 1 else smooth
            if len(kept):
                low, high = min(low, float(kept.min())), max(high, float(kept.max()))
        if math.isfinite(low):
            margin = 0.08 * (high - low) if high > low else max(abs(high), 1.0) * 0.1
            ax.set_ylim(low - margin, high + margin)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss term")
        ax.grid(alpha=0.3)
        if terms:
            ax.legend(fontsize=7)
    return _save(fig, out_png)


def validation_curves(probe_records_of: dict[str, list[dict]], histories: dict[str, dict], out_png: str):
    """Left: the probe's MRR@20 per evaluation of each stage. Right: each downstream row's validation
    MRR@20 per epoch, its selected (best) epoch marked.

    Args:
      probe_records_of: stage name -> its metrics.jsonl records (those with `eval/probe_mrr20` are drawn).
      histories: row -> its selection.json (`history` {epoch: MRR@20}, `best_epoch`).
    """
    fig, (probe_ax, row_ax) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    row_ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # a colour per row (there are 11)
    for name, records in probe_records_of.items():
        points = [(r["step"], r[PROBE_KEY]) for r in records if PROBE_KEY in r]
        if points:
            probe_ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    probe_ax.set_title("probe: next-item retrieval by e_K (validation)", fontsize=9)
    probe_ax.set_xlabel("step")
    probe_ax.set_ylabel("MRR@20 (%)")
    for name, selection in histories.items():
        history = sorted((int(epoch), value) for epoch, value in selection.get("history", {}).items())
        if not history:
            continue
        line, = row_ax.plot(*zip(*history), label=name, linewidth=1.0)
        best = selection.get("best_epoch")
        if best is not None and str(best) in selection["history"]:
            row_ax.plot([best], [selection["history"][str(best)]], marker="*", markersize=9,
                        color=line.get_color())
    row_ax.set_title("downstream rows: validation (* = selected epoch)", fontsize=9)
    row_ax.set_xlabel("epoch")
    row_ax.set_ylabel("MRR@20 (%)")
    for ax in (probe_ax, row_ax):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    return _save(fig, out_png)
