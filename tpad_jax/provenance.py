"""What shaped each trained artifact of a workdir, so that none is reused for other inputs.

A record is the prepared data's fingerprint, the values and sha256 of the config keys that shape the
artifact, and what else it read (the export a downstream row trained on):

    stage1                      data.*, model.*, stage1.*, seed, train.{grad_clip,weight_decay}
    stage2, stage2_<variant>    the same plus stage2.* (with the variant's overrides)
    export of the raw towers    data.*, model.*, seed
    export of stage1 / stage 2  the record of the stage it ran
    export_minilm               data.* and the encoder
    msbr/<row>                  data.*, msbr.*, seed, train.{grad_clip,weight_decay} and the export it read

Keys that only change speed (`NOT_SHAPING`) are left out, and so is a key added later while it holds the
value that reproduces what the code did before it existed (`ADDED_AT`): work recorded before the key
existed stays valid until the key is set to something else. A stage or downstream directory keeps its
record in DIR/<name>/inputs.json (a downstream row also in its selection.json), an export in its
export_meta.json ("inputs"). The policy: `claim` a directory before training into it. When its record
is another (or missing: work made before records existed) and the directory holds anything, it is moved
to DIR/stale/<name>.<k> and the work is redone from scratch; one line says so. A directory is never
restored or resumed for other inputs. Work that cannot be redone where it is read (an export read by a
downstream row) is refused with a `UserError` instead.
"""

import hashlib
import json
import os

import jax
from jax.experimental import multihost_utils

from tpad_jax import export, layout, rows
from tpad_jax import workdir as workdir_lib
from tpad_jax.cli import UserError
from tpad_jax.parallel import distributed
from tpad_jax.train import stages

RECORD_FILE = "inputs.json"
NOT_SHAPING = ("data.worker_count", "data.read_threads", "model.remat", "model.scan_layers",
               "msbr.checkpoint_every_epochs",
               # chosen at ranking time over the trained row; results are re-ranked
               "msbr.knn_fusion", "msbr.knn_fusion_metric")
TRAINING_KEYS = ("seed", "train.grad_clip", "train.weight_decay")
# Keys added after records existed, with the value that behaves as the code did before them.
ADDED_AT = {"model.base_param_dtype": "float32", "stage2.align_estimator": "infonce", "msbr.lr_decay": "cosine",
            "msbr.attention_dropout": 0.0, "msbr.transformer_norm": "pre",
            "msbr.transformer_init_std": 0.0, "stage1.keep_best": False, "stage2.keep_best": False,
            "model.knowledge_prior": ""}
_SHOWN_CHANGES = 4  # a message names this many changed keys, then counts the rest


def config_values(config, keys) -> dict:
    """{"section.key": value} of every leaf under `keys` (sections like "data" or single keys like
    "seed"), with `NOT_SHAPING` and keys at their `ADDED_AT` value left out; tuples become lists, as JSON
    stores them."""
    values = {}

    def collect(prefix, node):
        if hasattr(node, "items"):
            for name, child in node.items():
                collect(f"{prefix}.{name}", child)
        elif prefix not in NOT_SHAPING and not (prefix in ADDED_AT and node == ADDED_AT[prefix]):
            values[prefix] = list(node) if isinstance(node, tuple) else node

    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        collect(key, node)
    return json.loads(json.dumps(dict(sorted(values.items()))))


def make_record(data_fingerprint: str, config, keys, **read) -> dict:
    """The record of an artifact made from `data_fingerprint`, the config `keys` and `read` (an export id)."""
    values = config_values(config, keys)
    return {"data_fingerprint": data_fingerprint, "config": values,
            "config_hash": _sha256(values), **read}


def stage_record(config, data_fingerprint: str, variant: str) -> dict:
    """The record of the towers of export variant `variant`: initialized only, stage 1 or a stage 2."""
    source = rows.export_variant(variant).source
    if source == rows.RAW:
        return make_record(data_fingerprint, config, ("data", "model", "seed"), variant=variant)
    if source == rows.STAGE1:
        return make_record(data_fingerprint, config,
                           ("data", "model", "stage1", *TRAINING_KEYS, *_probe_keys(config, "stage1")),
                           variant=variant)
    return make_record(data_fingerprint, stages.stage2_config(config, variant),
                       ("data", "model", "stage1", "stage2", *TRAINING_KEYS,
                        *_probe_keys(config, "stage1", "stage2")), variant=variant)


def _probe_keys(config, *stage_names) -> tuple:
    """("train.eval_every",) where one of the stages ends with its best probed state (`keep_best`): the
    probe's schedule then decides which state it hands on. Elsewhere it only decides what is logged."""
    return ("train.eval_every",) if any(config[name].keep_best for name in stage_names) else ()


def export_record(config, data_fingerprint: str, variant: str) -> dict:
    """The record an export of `variant` (towers or the MiniLM encoder) made under `config` carries."""
    if rows.export_variant(variant).source == rows.MINILM:
        return make_record(data_fingerprint, config, ("data",), variant=variant, encoder=rows.MINILM_ENCODER)
    if rows.export_variant(variant).source == rows.ATTRIBUTES:
        return make_record(data_fingerprint, config, ("data",), variant=variant)
    return stage_record(config, data_fingerprint, variant)


def downstream_record(config, data_fingerprint: str, export_id: str | None) -> dict:
    """The record of a downstream row trained under `config` on the export `export_id` (None: ID only)."""
    return make_record(data_fingerprint, config, ("data", "msbr", *TRAINING_KEYS), export=export_id)


def identity(record: dict | None):
    """What two records must share to be the same inputs (the values are kept for messages only)."""
    return None if record is None else {key: value for key, value in record.items() if key != "config"}


def record_id(record: dict) -> str:
    """A short stable id of a record's identity (a downstream row records its export's)."""
    return _sha256(identity(record))[:16]


def differences(stored: dict | None, current: dict) -> str:
    """What differs between a stored record and the current one, for a one-line message."""
    if stored is None:
        return "no record of the inputs it was made from (made before inputs were recorded)"
    changes = []
    if stored.get("data_fingerprint") != current["data_fingerprint"]:
        changes.append(f"data fingerprint {str(stored.get('data_fingerprint'))[:8]} -> "
                       f"{current['data_fingerprint'][:8]}")
    old, new = stored.get("config", {}), current["config"]
    missing = "(absent)"
    changes += [f"{key} {old.get(key, missing)} -> {new.get(key, missing)}"
                for key in sorted(old.keys() | new.keys()) if old.get(key, missing) != new.get(key, missing)]
    if not changes and stored.get("config_hash") != current["config_hash"]:
        changes.append("config hash")
    changes += [f"{key} {stored.get(key)} -> {value}" for key, value in current.items()
                if key not in ("data_fingerprint", "config", "config_hash") and stored.get(key) != value]
    shown = "; ".join(changes[:_SHOWN_CHANGES])
    return shown + (f"; and {len(changes) - _SHOWN_CHANGES} more" if len(changes) > _SHOWN_CHANGES else "")


def read_record(directory: str) -> dict | None:
    """The record of DIR/<name>/inputs.json, or None when there is none."""
    return workdir_lib.read_json(os.path.join(directory, RECORD_FILE))


def claim(workdir: str, name: str, record: dict, label: str, redo: str = "retraining") -> bool:
    """Readies DIR/<name> for work from `record`'s inputs; returns whether earlier work was moved aside.

    Work made from the same inputs stays (to be restored or resumed). Anything else in the directory is
    moved to DIR/stale/ with one printed line: `<label>: <dir> was made from other inputs (<what
    changed>); moved to <path>; <redo>`. Then the record is written (atomically). Only the main
    process moves and writes; every process waits for it.
    """
    directory = os.path.join(workdir, name)
    stored = read_record(directory)
    moved = None
    if distributed.is_main_process() and identity(stored) != identity(record):
        if os.path.isdir(directory) and os.listdir(directory):
            moved = workdir_lib.move_aside(workdir, name)
            print(f"{label}: {directory} was made from other inputs ({differences(stored, record)}); "
                  f"moved to {moved}; {redo}", flush=True)
        os.makedirs(directory, exist_ok=True)
        with workdir_lib.atomic_open(os.path.join(directory, RECORD_FILE), encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"claim {name}")
    return moved is not None


def claim_results(workdir: str, data_fingerprint: str) -> None:
    """Readies DIR/results/ for results on this data: a report of other data is moved aside, not merged."""
    claim(workdir, layout.RESULTS, make_record(data_fingerprint, None, ()), "results", redo="starting a new report")


def export_id(directory: str, data_fingerprint: str) -> str:
    """The id of the export in `directory` after checking that it was made from this data.

    Raises:
      UserError when the export records other data, or no inputs (written before they were recorded).
    """
    stored = export.load_meta(directory).get("inputs")
    if stored is None or stored["data_fingerprint"] != data_fingerprint:
        why = differences(None, {}) if stored is None else (
            f"data fingerprint {stored['data_fingerprint'][:8]}, prepared data {data_fingerprint[:8]}")
        raise UserError(f"{directory}: not exported from the prepared data of this workdir ({why}); "
                        "launch/train.py exports it again")
    return record_id(stored)


def check_export(directory: str, config, data_fingerprint: str) -> None:
    """Raises UserError unless the export in `directory` is what `config` would export from this data."""
    meta = export.load_meta(directory)
    stored = meta.get("inputs")
    expected = None if stored is None else export_record(config, data_fingerprint, meta["variant"])
    if stored is None or identity(stored) != identity(expected):
        raise UserError(f"{directory}: exported from other inputs than these settings "
                        f"({differences(stored, expected)}); launch/train.py (--stage=export) exports it "
                        "again")


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()
