"""Recommends next items for sessions with a trained downstream model; one JSON line per session.

Usage:
  python launch/recommend.py --config configs/tpad_base.py --workdir runs/base \
      --sessions my_sessions.jsonl --top_k 20 [--model tpad]

`--sessions` is in the canonical format (`{"session_id": ..., "items": [item ids in click order]}`).
The model defaults to `tpad`, the method; the other neural rows (ablations, ID-only and classic-recipe
models) are comparison rows, served only when named. A model whose training did not finish is not
served. Item ids unknown to the catalogue are listed per session under "unknown_items" and left out of
its prefix; a session with no known item gets an "error" field instead of recommendations.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpad_jax import cli  # noqa: E402
from tpad_jax.data import raw, readonly  # noqa: E402
from tpad_jax.train import msbr  # noqa: E402

DEFAULT_MODEL = "tpad"  # the method, never whichever row won validation: the others are comparison rows


class _AnyItem:
    """A `known_items` that accepts every id: unknown ids are reported per session here, not dropped."""

    def __contains__(self, item_id):
        return True


def recommend(config, workdir: str, sessions_path: str, top_k: int, name: str = DEFAULT_MODEL):
    """Yields one output record (a dict) per session of `sessions_path`, in file order."""
    msbr.check_trained(workdir, name)  # before the data: an untrained workdir costs no preparation
    data = readonly.load(config, workdir)  # never prepares: serving leaves the workdir as it is
    model = msbr.load_selected(name, config, workdir, data)
    row_of = {item_id: row for row, item_id in enumerate(data.item_ids)}
    top_k = min(top_k, data.num_items)
    score_fn = msbr.prefix_scorer(model, msbr.prefix_width(config), batch_size=1)
    for session in raw.read_sessions(sessions_path, _AnyItem()):
        record = {"session_id": session.session_id, "model": name,
                  "unknown_items": [item for item in session.items if item not in row_of]}
        rows = np.array([row_of[item] for item in session.items if item in row_of], np.int32)
        if len(rows) == 0:
            record["error"] = "no item of this session is in the catalogue"
            record["recommendations"] = []
            yield record
            continue
        scores = np.asarray(score_fn([rows]))[0]
        best = np.argsort(-scores, kind="stable")[:top_k]
        record["recommendations"] = [
            {"item_id": data.item_ids[row], "title": data.titles[row], "score": float(scores[row])}
            for row in best.tolist()]
        yield record


def main():
    f = flags.FLAGS
    for record in recommend(f.config, f.workdir, f.sessions, f.top_k, f.model):
        print(json.dumps(record, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so tests can import this module next to other launchers.
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory holding the trained models (DIR/msbr/).")
    flags.DEFINE_string("sessions", None, "Canonical sessions.jsonl to recommend for.")
    flags.DEFINE_integer("top_k", 20, "Recommendations per session.")
    flags.DEFINE_string("model", DEFAULT_MODEL, f"A trained neural model ({', '.join(msbr.NEURAL_MODELS)}).")
    flags.mark_flags_as_required(["config", "workdir", "sessions"])
    cli.run(main)
