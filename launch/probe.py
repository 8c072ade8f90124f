"""Attribute probe of a finished run's exports (see tpad_jax/eval/probe.py).

Usage:
  python launch/probe.py --config configs/tpad_base.py --workdir runs/base

For every export in the workdir (DIR/export, DIR/export_<variant>): held-out accuracy of a linear probe
and 10-NN cosine purity for each latent attribute of the synthetic items (colour, category, shape,
material, style), plus the chance level. With `--input_features`, one more row: the frozen ViT
features that the towers read (`frozen-vit`, the item prompt's visual tokens side by side), i.e. what
the towers could keep of the image-only attributes. Writes DIR/results/attribute_probe.md and .csv and
prints the table. Attributes are known only for the synthetic catalogue; on other data it says so and
exits 0.
Without exports it says so on stderr and exits 2 (a user error, `tpad_jax/cli.py`).
"""

import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from tpad_jax import cli, export, layout
from tpad_jax.data import prepared
from tpad_jax.eval import probe
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import inputs as inputs_lib


def vision_input(config, workdir: str) -> dict:
    """{"frozen-vit": (features [N, tokens * width], item_ids)}: the frozen ViT features of the run's
    item tables, computed as a run computes them (same config and seed: the same ViT); {} without images."""
    data = prepared.load_or_prepare(config, workdir)
    inputs = inputs_lib.build_inputs(config, workdir, data)
    if not inputs.tpad_cfg.item_visual_tokens:
        return {}
    model = inputs.make_model()
    inputs.initialize(model)
    vision = np.asarray(mesh_lib.host_values(model.tables["vision"][...]), np.float32)[: data.num_items]
    return {"frozen-vit": (vision.reshape(data.num_items, -1), list(data.item_ids))}


def run(config, workdir: str, *, k=10, folds=5, l2=1.0, seed=0, input_features=False):
    """Writes DIR/results/attribute_probe.{md,csv} and returns the markdown; None off the synthetic data."""
    raw_dir = prepared.raw_dir_for(config, workdir)
    if not probe.is_synthetic_catalogue(raw_dir):
        if prepared.resolve_source(config.data) == "synthetic":
            raise cli.UserError(f"no synthetic catalogue in {raw_dir}; run launch/train.py on this workdir "
                                "first")
        print(f"attribute probe: item attributes are known only for the synthetic catalogue; {raw_dir} "
              "is not one, nothing to probe")
        return None
    exports = export.read_exports(workdir)
    if not exports:
        raise cli.UserError(f"no exports in {os.path.abspath(workdir)} "
                            "(DIR/export*/item_embeddings.npy); run launch/train.py first")
    if input_features:
        exports.update(vision_input(config, workdir))
    item_ids, attributes = probe.synthetic_attributes(raw_dir)
    settings = dict(k=k, folds=folds, l2=l2, seed=seed)
    rows = probe.attribute_rows(exports, item_ids, attributes, **settings)
    return probe.write_table(rows, layout.results_dir(workdir), **settings)


def main():
    workdir = flags.FLAGS.workdir
    text = run(flags.FLAGS.config, workdir, k=flags.FLAGS.k, folds=flags.FLAGS.folds, l2=flags.FLAGS.l2,
               seed=flags.FLAGS.seed, input_features=flags.FLAGS.input_features)
    if text is not None:
        print(text)
        results_dir = layout.results_dir(os.path.abspath(workdir))
        print(f"written to {os.path.join(results_dir, 'attribute_probe.md')} and .csv")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "A run directory with exports (DIR/export*).")
    flags.DEFINE_integer("k", 10, "Neighbours for the k-NN purity.")
    flags.DEFINE_integer("folds", 5, "Folds of the linear probe's cross-validation.")
    flags.DEFINE_float("l2", 1.0, "Ridge strength of the linear probe (standardised features).")
    flags.DEFINE_integer("seed", 0, "Seed of the fold assignment.")
    flags.DEFINE_bool("input_features", False, "Also probe the frozen ViT features the towers read (one ViT "
                      "pass over the catalogue).")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
