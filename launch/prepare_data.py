"""Prepares a workdir's data (splits, tokenizer, TFDS item table) and prints its statistics.

Usage:
  python launch/prepare_data.py --config configs/tpad_base.py --workdir runs/base
  python launch/prepare_data.py --config configs/tpad_base.py:tiny --workdir runs/tiny
"""

import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from tpad_jax import cli, pretrained, workdir as workdir_lib
from tpad_jax.data import pipeline, prepared, tfds_builder, tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/tpad_base.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; data goes to DIR/data/.")

SPLITS = ("train", "valid", "test")


def statistics(data, tokenizer):
    """(name, value) rows describing the prepared data, the tokenizer and what was skipped."""
    rows = [("items", data.num_items), ("items with image", int(np.sum(data.has_image))),
            ("tokenizer vocabulary", tokenizer.get_vocab_size())]
    for split in SPLITS:
        sessions = getattr(data, split)
        prefixes, targets = data.examples(split)
        rows += [(f"{split} sessions", len(sessions)),
                 (f"{split} average session length", f"{np.mean([len(s) for s in sessions]):.2f}"
                  if sessions else "-"),
                 (f"{split} examples", len(targets))]
        if split != "train":
            share = f"{100 * np.mean(data.cold_mask(targets)):.1f} %" if len(targets) else "-"
            rows.append((f"{split} cold-target share", share))
    rows.append(("stage-2 train examples (every position)",
                 len(pipeline.SessionExamples.every_position(data.train))))
    rows += [(f"skipped: {name}", value) for name, value in _flat_counts(data.stats.get("skipped", {}))]
    rows += [(f"filtered: {name}", value) for name, value in _flat_counts(data.stats.get("filtering", {}))]
    return rows


def format_table(rows):
    """Two aligned columns."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _flat_counts(stats, prefix=""):
    """Integer leaves of a nested stats dict as ("a.b", count), in key order."""
    counts = []
    for key, value in sorted(stats.items()):
        if isinstance(value, dict):
            counts += _flat_counts(value, f"{prefix}{key}.")
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            counts.append((f"{prefix}{key}", int(value)))
    return counts


def main():
    config, workdir = _CONFIG.value, _WORKDIR.value
    start = time.perf_counter()
    with workdir_lib.lock(workdir):
        data = prepared.load_or_prepare(config, workdir)
        tokenizer = tokenizer_lib.tokenizer_for(config, data, workdir,
                                                pretrained.tokenizer_source(config, workdir))
        tfds_builder.build_item_table(data, workdir)
    print(format_table(statistics(data, tokenizer)))
    print(f"prepared {workdir}/data in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
