"""Seed spread of downstream rows: the same features and data, other downstream seeds.

A finished run trains every downstream row once (seed `config.seed`). Differences between rows of
about a point of MRR@20 are within what another downstream seed changes, so a claim that one feature
set beats another needs the spread. For each extra seed s this trains the chosen rows again in
DIR/seeds/seed<s>/ (the run's prepared data and exports are linked, not copied or retrained) and
reports mean and standard deviation over all seeds, the run's own included, of validation MRR@20 (the
selection metric) and of test HR@20, MRR@20 and cold HR@20.
"""

import csv
import os

import numpy as np

from tpad_jax import evaluate, layout, rows
from tpad_jax.downstream import selection as selection_lib
from tpad_jax.downstream import training
from tpad_jax.eval import metrics
from tpad_jax.workdir import atomic_open

COLUMNS = (("valid", "all", "MRR"), ("test", "all", "HR"), ("test", "all", "MRR"), ("test", "cold", "HR"))


def linked_workdir(source: str, directory: str) -> str:
    """`directory` with `source`'s prepared data and exports linked in (read, never written)."""
    os.makedirs(directory, exist_ok=True)
    for entry in os.listdir(source):
        if entry == layout.DATA or layout.is_export_name(entry):
            link = os.path.join(directory, entry)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(source, entry)), link)
    return directory


def seed_workdir(workdir: str, seed: int) -> str:
    """DIR/seeds/seed<s>/ with DIR's prepared data and exports linked in."""
    return linked_workdir(workdir, layout.downstream_seed_dir(workdir, seed))


def seed_values(name: str, config, workdir: str, data) -> dict:
    """{(split, slice, metric): value} of row `name` trained (or restored) in `workdir` under `config`."""
    ranks = training.evaluate_neural(name, config, workdir, data)  # trains when not yet finished
    selection = selection_lib.read_selection(layout.row_dir(workdir, rows.trained_row(name)))
    _, targets = data.examples(training.TEST_SPLIT)
    cold = np.asarray(data.cold_mask(targets), bool)
    values = {("valid", "all", "MRR"): float(selection["best_metric"])}
    for slice_name, mask in (("all", np.ones_like(cold)), ("cold", cold)):
        if mask.any():
            test = metrics.metrics_from_ranks(ranks[mask], (20,))
            values.update({("test", slice_name, m): float(test[(m, 20)]) for m in ("HR", "MRR")})
    return values


def neural_rows(config) -> list[str]:
    """The rows of `config.eval.models` that train a downstream model: what other downstream seeds
    retrain unless told otherwise."""
    return [name for name in evaluate.configured_models(config) if name in rows.names(rows.neural())]


def extra_downstream_seeds(seed: int, count: int) -> list[int]:
    """The downstream seeds a whole-pipeline seed `seed` adds to its own: seed + 1000 k, k = 1..count
    (distinct from every pipeline seed below 1000, so no downstream model repeats another seed's)."""
    return [seed + 1000 * k for k in range(1, count + 1)]


def other_seed(config, workdir: str, seed: int):
    """(config with downstream seed `seed`, DIR/seeds/seed<seed>/ on `workdir`'s data and exports) for a
    seed other than the run's own."""
    if seed == config.seed:
        raise ValueError(f"seed {seed} is the run's own seed; pass other seeds")
    seeded = config.copy_and_resolve_references()
    seeded.seed = seed
    return seeded, seed_workdir(workdir, seed)


def downstream_ranks(names, config, workdir: str, data, seed: int) -> dict:
    """{name: int [num_test] test ranks} of the rows `names` trained (or restored) with downstream seed
    `seed` in DIR/seeds/seed<seed>/ on `workdir`'s data and exports."""
    seeded, directory = other_seed(config, workdir, seed)
    return {name: training.evaluate_neural(name, seeded, directory, data) for name in names}


def seed_spread(names, config, workdir: str, data, extra_seeds) -> dict:
    """{name: {column: [value per seed]}}, the run's own seed (`config.seed`) first."""
    runs = [(config, workdir)] + [other_seed(config, workdir, seed) for seed in extra_seeds]
    spread = {}
    for name in names:
        per_seed = [seed_values(name, seeded, directory, data) for seeded, directory in runs]
        spread[name] = {column: [values.get(column, float("nan")) for values in per_seed] for column in COLUMNS}
    return spread


def markdown(spread: dict, seeds) -> str:
    """One row per model: mean +- std over `seeds` of each column (values in %)."""
    header = ["model"] + [f"{split} {metric}@20{' cold' if s == 'cold' else ''}" for split, s, metric in COLUMNS]
    lines = [f"Seeds: {', '.join(str(s) for s in seeds)} (mean +- standard deviation)", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, columns in spread.items():
        cells = [f"{np.mean(v):.2f} +- {np.std(v, ddof=1) if len(v) > 1 else 0.0:.2f}" for v in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_spread(spread: dict, seeds, results_dir: str) -> str:
    """Writes results_dir/seeds.md and seeds.csv (one line per model, column and seed); returns the md."""
    os.makedirs(results_dir, exist_ok=True)
    text = markdown(spread, seeds)
    with atomic_open(os.path.join(results_dir, "seeds.md")) as f:
        f.write(text)
    with atomic_open(os.path.join(results_dir, "seeds.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "split", "slice", "metric", "k", "seed", "value"])
        for name, columns in spread.items():
            for (split, slice_name, metric), values in columns.items():
                writer.writerows([name, split, slice_name, metric, 20, seed, f"{v:.2f}"]
                                 for seed, v in zip(seeds, values))
    return text
