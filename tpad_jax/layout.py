"""Where each thing of a run lives in its workdir (DIR): every path a stage reads or writes.

    DIR/config.json                      the run's config (written by every run, read by serving)
    DIR/data/prepared/, data/tokenizer.json   the prepared catalogue and split, the run's tokenizer
    DIR/data/raw/                        the synthetic catalogue, when the data is synthetic
    DIR/stage1/, stage2/, stage2_<v>/    checkpoints and metrics.jsonl of stage 1 and each stage-2 variant
    DIR/export/, export_<v>/             item embeddings of each export variant (the main one unsuffixed)
    DIR/msbr/<row>/                      a downstream row: checkpoints, selection.json, best.npz
    DIR/results/                         results.csv / .md, ranks, probe.json, plots
    DIR/seeds/seed<s>/                   extra downstream seeds; DIR/seed<s>/ whole-pipeline seeds
    DIR/stale/<name>.<k>                 work made from other inputs, moved aside

Names are relative to DIR (`provenance.claim` and `workdir.move_aside` take those); `*_dir` and
`*_file` functions give paths. Which variants exist is `rows.py`'s; how their directories are named is
decided here.
"""

import os

from tpad_jax import rows

CONFIG_FILE = "config.json"
DATA = "data"
DOWNSTREAM = "msbr"
RESULTS = "results"
STALE = "stale"
SELECTION_FILE = "selection.json"
FUSION_FILE = "knn_fusion.json"  # the kNN fusion weight chosen on validation (msbr.knn_fusion)
BEST_PARAMS = "best.npz"
_EXPORT = "export"
_STAGE = "stage"


def config_file(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def prepared_dir(workdir: str) -> str:
    return os.path.join(workdir, DATA, "prepared")


def synthetic_raw_dir(workdir: str) -> str:
    """DIR/data/raw: where the synthetic catalogue is written (other sources name their own)."""
    return os.path.join(workdir, DATA, "raw")


def tokenizer_file(workdir: str) -> str:
    return os.path.join(workdir, DATA, "tokenizer.json")


def stage_name(variant: str) -> str | None:
    """The directory name of the stage that trained export variant `variant` (None: nothing trained)."""
    source = rows.export_variant(variant).source
    if source == rows.STAGE1:
        return f"{_STAGE}1"
    if source == rows.STAGE2:
        return f"{_STAGE}2" if variant == rows.MAIN_VARIANT else f"{_STAGE}2_{variant}"
    return None


def stage_dir(workdir: str, variant: str) -> str:
    """DIR/stage1 or DIR/stage2[_<variant>]."""
    return os.path.join(workdir, stage_name(variant))


def is_stage_name(entry: str) -> bool:
    """Whether a workdir entry is a stage directory."""
    return entry.startswith(_STAGE)


def export_name(variant: str) -> str:
    return _EXPORT if variant == rows.MAIN_VARIANT else f"{_EXPORT}_{variant}"


def export_dir(workdir: str, variant: str) -> str:
    """DIR/export or DIR/export_<variant>."""
    return os.path.join(workdir, export_name(variant))


def is_export_name(entry: str) -> bool:
    """Whether a workdir entry is an export directory (nothing else may be written there)."""
    return entry.startswith(_EXPORT)


def row_name(row: str) -> str:
    return os.path.join(DOWNSTREAM, row)


def row_dir(workdir: str, row: str) -> str:
    """DIR/msbr/<row>/."""
    return os.path.join(workdir, row_name(row))


def best_params_file(workdir: str, row: str) -> str:
    return os.path.join(row_dir(workdir, row), BEST_PARAMS)


def results_dir(workdir: str) -> str:
    return os.path.join(workdir, RESULTS)


def downstream_seed_dir(workdir: str, seed: int) -> str:
    """DIR/seeds/seed<s>/: other downstream seeds on DIR's data and exports."""
    return os.path.join(workdir, "seeds", f"seed{seed}")


def pipeline_seed_dir(workdir: str, seed: int) -> str:
    """DIR/seed<s>/: a whole run of its own."""
    return os.path.join(workdir, f"seed{seed}")


def stale_dir(workdir: str) -> str:
    return os.path.join(workdir, STALE)
