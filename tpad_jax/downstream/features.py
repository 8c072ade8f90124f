"""The content features a downstream row reads: an export of the workdir, and their normalisation."""

import numpy as np

from tpad_jax import export, layout
from tpad_jax.cli import UserError


def complete_export_dir(workdir: str, variant: str) -> str:
    """The export directory of `variant`, once it holds a whole export (else UserError)."""
    directory = layout.export_dir(workdir, variant)
    if not export.is_complete(directory):
        raise UserError(
            f"{directory}/{export.EMBEDDINGS_FILE}: missing; run the stage that exports these features first")
    return directory


def load_features(workdir: str, variant: str | None, data) -> np.ndarray | None:
    """The exported features [N, d_c] of export variant `variant` as written (None: ID only)."""
    if variant is None:
        return None
    directory = complete_export_dir(workdir, variant)
    embeddings, item_ids, _ = export.load_export(directory)
    if list(item_ids) != list(data.item_ids):
        raise UserError(f"{directory}/item_ids.json: rows do not match the prepared catalogue "
                        f"({len(item_ids)} ids vs {data.num_items}); re-export for this data")
    return embeddings


CONTENT_NORMS = ("l2", "whiten")


def normalise_content(embeddings: np.ndarray, normalise: str, eps: float = 1e-3) -> np.ndarray:
    """`l2`: each row to unit length. `whiten`: centred and PCA-whitened over the catalogue (directions
    with variance below `eps` x the largest are damped, not blown up), scaled to mean squared norm 1.

    Why whiten: trained e_K are low-rank and clustered (a few attribute directions carry most of the
    variance), so under `l2` the projection sees items of one cluster as near-identical; whitening gives
    every direction the catalogue varies in the same weight.
    """
    return content_transform(embeddings, normalise, eps)(embeddings)


def content_transform(features: np.ndarray, normalise: str, eps: float = 1e-3):
    """The map `normalise_content(features, normalise)` applies to each row, fitted on `features` once,
    so that rows outside them (new items) get the catalogue's statistics, not their own."""
    if normalise == "l2":  # per row: nothing to fit
        def unit(rows):
            x = np.asarray(rows, np.float64)
            return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return unit
    if normalise != "whiten":
        raise UserError(f"msbr.content_norm must be one of {CONTENT_NORMS}, got {normalise!r}")
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    variances, vectors = np.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    variances = np.maximum(variances, 0.0)
    scale = np.sqrt(variances + eps * variances.max())
    white = ((x - mean) @ vectors) / scale
    norm = np.sqrt(np.mean(np.sum(white * white, axis=1)))

    def whiten(rows):
        return ((((np.asarray(rows, np.float64) - mean) @ vectors) / scale) / norm).astype(np.float32)
    return whiten
