"""The rows of the comparison and the export variants they read: the one registry of both.

A row is a baseline (fitted on the train sessions, `eval/baselines.py`, or an export's item-to-item
similarity: a `-knn` row ranks items by cosine to the last click, with no training) or a neural row: one session
encoder (`models/session_encoders.py`) over item IDs, with the content features of one export variant
when it names one. An export variant says where its item embeddings come from: the initialized towers
(`raw`), stage 1, a stage-2 variant (the main run or an ablation, each a few `stage2.*` overrides away
from the config) or the frozen MiniLM text encoder. Everything that lists rows or variants reads them
here: the config's defaults (`eval.models`, `msbr.per_model`), the runner (which stages and exports a
run needs), evaluation, downstream training and serving. Adding an ablation is one `ExportVariant` and
one `Row` below.
"""

import dataclasses
from collections.abc import Mapping

from tpad_jax.cli import UserError

BASELINE = "baseline"
NEURAL = "neural"
ORACLE = "oracle"  # the baseline that reads the synthetic generator's true next-item distribution

# Where an export variant's embeddings come from.
RAW = "raw"  # the initialized, untrained towers
STAGE1 = "stage1"
STAGE2 = "stage2"
MINILM = "minilm"  # the frozen text encoder below, not a TPAD tower
MINILM_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# The synthetic generator's true item attributes, one-hot: what a perfect item representation knows, so
# the row reading them bounds what any representation can give the downstream model (a diagnostic,
# like the oracle; synthetic catalogues only).
ATTRIBUTES = "attributes"
TOWER_SOURCES = (RAW, STAGE1, STAGE2)
MAIN_VARIANT = "tpad"  # the stage-2 variant of the method itself (the others are its ablations)


@dataclasses.dataclass(frozen=True)
class ExportVariant:
    """Item embeddings of one kind: `source` made them; a stage-2 variant trains with `stage2_overrides`."""

    name: str
    source: str  # RAW, STAGE1, STAGE2, MINILM or ATTRIBUTES
    stage2_overrides: Mapping = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the comparison.

    `encoder`: the session encoder of a neural row. `export`: the export variant whose features it reads
    (None: item IDs only). `knn`: the export whose item-kNN the row's ranking is fused with under
    `msbr.knn_fusion` (None: its own export). `default`: run when `eval.models` is not given. The
    default run is the method and what says whether it pays (the baselines, the ID-only transformer, the
    same transformer over the untrained and the stage-1 towers); the other encoders and the ablations are
    the `full` preset's.
    """

    name: str
    kind: str  # BASELINE or NEURAL
    encoder: str | None = None
    export: str | None = None
    default: bool = True
    knn: str | None = None


EXPORT_VARIANTS = (
    ExportVariant(RAW, RAW),
    ExportVariant(STAGE1, STAGE1),
    # The main run and the paper's ablations, each one flag away from it.
    ExportVariant(MAIN_VARIANT, STAGE2),
    ExportVariant("no-gen", STAGE2, {"gen_weight": 0.0}),
    ExportVariant("no-disentangle", STAGE2, {"disentangle": "none"}),
    # The MMD term matches e_K's batch distribution to z_trans's: it is part of the alignment too.
    ExportVariant("no-align", STAGE2, {"align_weight": 0.0, "mmd_weight": 0.0}),
    ExportVariant(MINILM, MINILM),
    ExportVariant(ATTRIBUTES, ATTRIBUTES),
)

# In report order.
ROWS = (
    Row(ORACLE, BASELINE),
    Row("pop", BASELINE),
    Row("s-pop", BASELINE),
    Row("markov", BASELINE),
    Row("sknn", BASELINE),
    # Content item-kNN (`export.retrieval_ranks`): the retrieval probe of an export as a row, so its
    # difference from the neural rows gets the same significance test. On real titles the frozen MiniLM
    # similarity alone is a strong row (benchmarks/RESULTS.md); `tpad-knn` is what e_K gives alone.
    Row("minilm-knn", BASELINE, export=MINILM, default=False),
    Row("tpad-knn", BASELINE, export=MAIN_VARIANT, default=False),
    Row("gru4rec", NEURAL, "gru4rec", default=False),
    Row("transformer", NEURAL, "transformer"),
    Row("srgnn", NEURAL, "srgnn", default=False),
    Row("transformer+raw", NEURAL, "transformer", RAW),
    Row("transformer+stage1", NEURAL, "transformer", STAGE1),
    Row("tpad", NEURAL, "transformer", MAIN_VARIANT),
    Row("srgnn+tpad", NEURAL, "srgnn", MAIN_VARIANT, default=False),
    Row("tpad-no-gen", NEURAL, "transformer", "no-gen", default=False),
    Row("tpad-no-disentangle", NEURAL, "transformer", "no-disentangle", default=False),
    Row("tpad-no-align", NEURAL, "transformer", "no-align", default=False),
    # The classic MSBR recipe (frozen sentence embeddings): run on request, it loads a wheel.
    Row("transformer+minilm", NEURAL, "transformer", MINILM, default=False),
    # The classic recipe's trained row with TPAD's e_K as its kNN term: under `msbr.knn_fusion` it ranks
    # by score(v) + w x cos(e_K[last click], e_K[v]) instead of MiniLM's cosine. On Beauty it beat the
    # classic recipe on HR@20 and cold HR@20 on three seed triples (benchmarks/RESULTS.md, "Choosing the
    # fusion weight on HR@20"). It ranks transformer+minilm's trained model (`trained_row`).
    Row("transformer+minilm+tpad-knn", NEURAL, "transformer", MINILM, default=False, knn=MAIN_VARIANT),
    # The same with stage 1's e_K as the features: K's knowledge feeds the recommender, the transitions
    # that stage 2 distilled into e_K its kNN term. It ranks transformer+stage1's trained model; on Beauty
    # seeds 12-14 it beat fused transformer+minilm and fused transformer+stage1 on HR@20 and cold HR@20,
    # on seeds 15-17 it tied them (benchmarks/RESULTS.md, "Stage 1's features with TPAD's kNN").
    Row("transformer+stage1+tpad-knn", NEURAL, "transformer", STAGE1, default=False, knn=MAIN_VARIANT),
    Row("transformer+attributes", NEURAL, "transformer", ATTRIBUTES, default=False),
)


def get(name: str) -> Row:
    """The row `name`; UserError naming the known rows otherwise."""
    for row in ROWS:
        if row.name == name:
            return row
    raise UserError(f"unknown model {name!r}; known: {', '.join(row.name for row in ROWS)}")


def neural_row(name: str) -> Row:
    """The neural row `name`; UserError naming the neural rows otherwise."""
    row = next((row for row in neural() if row.name == name), None)
    if row is None:
        raise UserError(f"unknown neural model {name!r}; known: {', '.join(names(neural()))}")
    return row


def baselines() -> tuple[Row, ...]:
    return tuple(row for row in ROWS if row.kind == BASELINE)


def session_baselines() -> tuple[Row, ...]:
    """The baselines fitted on the train sessions alone (`eval/baselines.py`): those that read no export."""
    return tuple(row for row in baselines() if row.export is None)


def neural() -> tuple[Row, ...]:
    return tuple(row for row in ROWS if row.kind == NEURAL)


def defaults() -> tuple[Row, ...]:
    """The rows a run evaluates unless `eval.models` says otherwise."""
    return tuple(row for row in ROWS if row.default)


def full_table() -> tuple[Row, ...]:
    """Every row but those reading MiniLM (it loads an extra wheel), the attribute bound (synthetic data
    only) and those fused with another export's kNN (without `msbr.knn_fusion`, which the full table does
    not turn on, each ranks exactly as the row whose model it ranks); name them in `eval.models` to add
    them."""
    return tuple(row for row in ROWS if row.export not in (MINILM, ATTRIBUTES) and row.knn is None)


def names(rows) -> tuple[str, ...]:
    return tuple(row.name for row in rows)


def export_of(name: str) -> str | None:
    """The export variant row `name` reads (None: an ID-only row, a baseline or an unknown name)."""
    return next((row.export for row in ROWS if row.name == name), None)


def knn_export_of(name: str) -> str | None:
    """The export whose item-kNN row `name` is fused with under `msbr.knn_fusion`: its `knn`, else its own
    export (None: an ID-only row, a baseline or an unknown name)."""
    row = next((row for row in ROWS if row.name == name), None)
    return None if row is None or row.export is None else (row.knn or row.export)


def trained_row(name: str) -> str:
    """The row whose trained model row `name` ranks: for a row fused with another export's kNN, the row of
    the same encoder and features without it (one trained model, two rankings: the two rows then differ
    in the kNN term alone, not in training noise); otherwise `name` itself."""
    row = neural_row(name)
    if row.knn is None:
        return name
    return next(other.name for other in neural()
                if (other.encoder, other.export, other.knn) == (row.encoder, row.export, None))


def export_variant(name: str) -> ExportVariant:
    """The export variant `name`; ValueError naming the known ones otherwise."""
    for variant in EXPORT_VARIANTS:
        if variant.name == name:
            return variant
    raise ValueError(f"unknown export variant {name!r}; choose from {list(names(EXPORT_VARIANTS))}")


def stage2_variants() -> tuple[ExportVariant, ...]:
    return tuple(variant for variant in EXPORT_VARIANTS if variant.source == STAGE2)


def needed_exports(row_names) -> tuple[ExportVariant, ...]:
    """The export variants the rows `row_names` read (features or kNN), in registry order (unknown names
    read none)."""
    wanted = {export for row in ROWS if row.name in set(row_names) for export in (row.export, row.knn)}
    return tuple(variant for variant in EXPORT_VARIANTS if variant.name in wanted)
