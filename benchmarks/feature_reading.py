"""What a trained content row reads of its features, and of what stage 2 changed (issue 15).

    python benchmarks/feature_reading.py --workdir RUN [--config configs/tpad_prior.py] [--set KEY=VALUE ...]
        [--no-record]

RUN is a finished run (read only). A content row's item vector is x_v = a_v E_id[v] + W f_v, f_v the row's
normalised export (whitened: every direction the catalogue varies in has variance 1) and W its learned
projection. Per trained content row, printed and appended to RESULTS.md:

- `content/ID`: the median of ||W f_v|| / ||a_v E_id[v]|| over the warm items and over the cold ones
  (< `data.cold_threshold` train clicks): how much of an item's vector its content is.
- `W in top-k`: the share of ||W||_F^2 in the k directions of largest catalogue variance of the export
  (k = 8, 32; the export's principal directions, which whitening has made of equal variance), against
  k/d for a W that read every direction alike.
- `reads stage 2`: for the rows over stage 1's and over TPAD's export, the gain with which W passes
  stage 2's change, Delta_v = e_tpad[v] - e_stage1[v] seen through the row's own normalisation:
  (sum_v ||Delta_v W||^2 / sum_v ||Delta_v||^2) / (||W||_F^2 / d). 1 is what a W that read every
  direction alike would give; below 1, W reads the directions stage 2 moved less than the average one.
- `stage 2 share`: sum_v ||Delta_v||^2 / sum_v ||f_v - mean f||^2, how large stage 2's change is beside
  the spread of the row's own features (whitened features have mean squared norm 1).
"""

import argparse
import os

import numpy as np
from flax import nnx

from common import ROOT, apply_overrides, emit_row, print_and_record
from train_step import load_config
from tpad_jax import layout, rows
from tpad_jax.data import readonly
from tpad_jax.downstream import features, serving, settings

COLUMNS = ["run", "row", "export", "content/ID warm", "content/ID cold", "W in top-8 (uniform)",
           "W in top-32 (uniform)", "reads stage 2", "stage 2 share", "machine"]
SECTION = "What the downstream reads of e_K"
NOTE = ("`python benchmarks/feature_reading.py --config configs/tpad_prior.py --workdir RUN`: per trained "
        "content row, the median ||W f_v|| / ||a_v E_id[v]|| (warm, cold items), the share of ||W||_F^2 in "
        "the export's 8 and 32 directions of largest variance (in brackets: k/d, a W that reads every "
        "direction alike), the gain with which W passes stage 2's change e_tpad - e_stage1 (1: as an "
        "average direction), and that change's squared size over the features' spread (`stage 2 share`).")
STAGE1, TPAD = "stage1", rows.MAIN_VARIANT


def principal_directions(embeddings: np.ndarray) -> np.ndarray:
    """The export's principal directions [d, d] as columns, largest catalogue variance first."""
    x = np.asarray(embeddings, np.float64)
    x = x - x.mean(axis=0)
    variances, vectors = np.linalg.eigh(x.T @ x / len(x))
    return vectors[:, np.argsort(variances)[::-1]]


def reading_profile(kernel: np.ndarray, embeddings: np.ndarray, normalise: str, ks=(8, 32)) -> list[float]:
    """The share of ||W||_F^2 in the export's k directions of largest variance, in the row's feature
    coordinates: whitening rotates to the principal axes (and rescales), so those directions are the
    normalised images of the principal directions."""
    transform = features.content_transform(embeddings, normalise)
    mean = np.asarray(embeddings, np.float64).mean(axis=0)
    images = transform(mean + principal_directions(embeddings).T) - transform(mean[None])  # [d, d_f]
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    energy = np.sum((images @ kernel) ** 2, axis=1)  # W's energy along each (near-orthogonal) image
    return [float(energy[:k].sum() / energy.sum()) for k in ks]


def stage2_gain(kernel: np.ndarray, embeddings: np.ndarray, normalise: str, stage1, tpad) -> tuple[float, float]:
    """(gain, share): gain = (sum_v ||Delta_v W||^2 / sum_v ||Delta_v||^2) / (||W||_F^2 / d), how strongly W
    passes stage 2's change Delta_v = f(e_tpad[v]) - f(e_stage1[v]) relative to an average direction, f the
    row's own map; share = sum_v ||Delta_v||^2 / sum_v ||f(e[v]) - mean||^2, the change beside the spread."""
    transform = features.content_transform(embeddings, normalise)
    delta = transform(tpad).astype(np.float64) - transform(stage1)
    own = transform(embeddings).astype(np.float64)
    passed = np.sum((delta @ kernel) ** 2) / np.sum(delta ** 2)
    share = np.sum(delta ** 2) / np.sum((own - own.mean(axis=0)) ** 2)
    return float(passed / (np.sum(kernel.astype(np.float64) ** 2) / kernel.shape[0])), float(share)


def content_to_id(model, counts: np.ndarray, cold_threshold: int) -> tuple[float, float]:
    """Median ||W f_v|| / ||a_v E_id[v]|| over warm and over cold items."""
    content = np.asarray(model.content_projection(model.content[...]))
    ids = np.asarray(model.id_embedding.embedding[...])
    if model.id_scale is not None:
        ids = np.asarray(model.id_scale[...]) * ids
    ratio = np.linalg.norm(content, axis=1) / np.maximum(np.linalg.norm(ids, axis=1), 1e-12)
    cold = counts < cold_threshold
    return float(np.median(ratio[~cold])), float(np.median(ratio[cold]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tpad_prior.py"))
    parser.add_argument("--preset", default=None, help="the config file's argument (e.g. full)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="the run's config overrides")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config, args.preset), args.set)
    data = readonly.load(config, args.workdir)
    exports = {variant: features.load_features(args.workdir, variant, data) for variant in (STAGE1, TPAD)
               if os.path.isdir(layout.export_dir(args.workdir, variant))}
    results = []
    for row in rows.neural():
        if row.export is None or row.name != rows.trained_row(row.name) or not os.path.exists(
                layout.best_params_file(args.workdir, row.name)):
            continue
        embeddings = exports.get(row.export)
        if embeddings is None:
            embeddings = features.load_features(args.workdir, row.export, data)
        model = serving.load_selected(row.name, config, args.workdir, data, features=embeddings)
        if not isinstance(model.content_projection, nnx.Linear) or model.id_embedding is None:
            continue  # the profile is that of one linear map beside an ID table
        kernel = np.asarray(model.content_projection.kernel[...], np.float64)
        normalise = settings.row_config(row.name, config).msbr.content_norm
        warm, cold = content_to_id(model, data.train_item_counts, data.cold_threshold)
        top8, top32 = reading_profile(kernel, embeddings, normalise)
        gain, share = (stage2_gain(kernel, embeddings, normalise, exports[STAGE1], exports[TPAD])
                       if len(exports) == 2 and row.export in exports else (float("nan"), float("nan")))
        d = kernel.shape[0]
        results.append(emit_row("feature_reading", {
            "run": os.path.basename(os.path.normpath(args.workdir)), "row": row.name, "export": row.export,
            "content/ID warm": round(warm, 3), "content/ID cold": round(cold, 3),
            "W in top-8 (uniform)": f"{top8:.3f} ({8 / d:.3f})",
            "W in top-32 (uniform)": f"{top32:.3f} ({32 / d:.3f})", "reads stage 2": round(gain, 3),
            "stage 2 share": round(share, 3)}))
    print_and_record(SECTION, COLUMNS, results, NOTE, record=not args.no_record)


if __name__ == "__main__":
    main()
