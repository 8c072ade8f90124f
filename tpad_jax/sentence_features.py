"""Frozen all-MiniLM-L6-v2 embeddings of the item texts, computed once per workdir.

Two readers: the `transformer+minilm` row (the classic MSBR recipe's export) and K's knowledge prior
(`model.knowledge_prior="minilm"`, `models/tpad.py`), which adds them to e_K through a trained map. Both
read the same cached export, DIR/export_minilm.
"""

import numpy as np

from tpad_jax import export, layout, rows
from tpad_jax.cli import UserError
from tpad_jax.parallel import distributed

# What each knowledge prior reads and its width (checked against the encoder when it loads).
PRIOR_ENCODERS = {"minilm": (rows.MINILM, 384)}


def item_text(title: str, category: str | None) -> str:
    """The text a frozen text encoder reads per item: its title, and its category when there is one."""
    return title if not category else f"{title}. Category: {category}."


def encode(texts: list[str]) -> np.ndarray:
    """MiniLM's L2-normalised embeddings of `texts`, float32 [len(texts), 384]."""
    from tpad_jax.models import bert  # noqa: PLC0415  (loads the wheel only when MiniLM is asked for)

    return bert.MiniLMEncoder.from_installed_wheel().encode(texts)


def catalogue_embeddings(config, workdir: str, data, variant: str = rows.MINILM) -> np.ndarray:
    """The MiniLM embeddings of the catalogue's items in prepared order, written as the export of
    `variant` the first time (main process) and read back after that while their record matches."""
    from tpad_jax import provenance  # noqa: PLC0415  (provenance imports the stages, which import this)

    out_dir = layout.export_dir(workdir, variant)
    record = provenance.export_record(config, data.fingerprint, variant)
    if export.is_complete(out_dir) and provenance.identity(export.load_meta(out_dir).get("inputs")) == \
            provenance.identity(record):
        return export.load_export(out_dir)[0]
    embeddings = encode([item_text(title, category) for title, category in zip(data.titles, data.categories)])
    if distributed.is_main_process():
        export.write_export(out_dir, embeddings, data.item_ids,
                            {"variant": variant, "encoder": rows.MINILM_ENCODER,
                             "dataset_fingerprint": data.fingerprint, "inputs": record})
    return embeddings


def prior_dim(config) -> int:
    """Width of K's knowledge prior under `config` (0: none); UserError for an unknown prior."""
    name = config.model.get("knowledge_prior", "") or ""
    if not name:
        return 0
    if name not in PRIOR_ENCODERS:
        raise UserError(f"model.knowledge_prior={name!r}: choose '' (none) or "
                        + ", ".join(repr(key) for key in PRIOR_ENCODERS))
    return PRIOR_ENCODERS[name][1]


def prior_features(config, workdir: str, data) -> np.ndarray | None:
    """K's knowledge prior of every catalogue item [N, prior_dim], or None when `config` has none."""
    if not prior_dim(config):
        return None
    features = catalogue_embeddings(config, workdir, data, PRIOR_ENCODERS[config.model.knowledge_prior][0])
    if features.shape[1] != prior_dim(config):
        raise ValueError(f"{config.model.knowledge_prior} embeddings are {features.shape[1]}-d, "
                         f"expected {prior_dim(config)}")
    return features
