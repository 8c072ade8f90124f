"""Recommends next items for sessions with a trained downstream model; one JSON line per input line.

Usage:
  python launch/recommend.py --workdir runs/base --sessions my_sessions.jsonl --top_k 20 \
      [--model tpad] [--config configs/tpad_base.py] [--noexclude_seen] [--new_items new/items.jsonl]
  cat my_sessions.jsonl | python launch/recommend.py --workdir runs/base --sessions -

A thin front of `tpad_jax.recommender.Recommender` (scores, shapes and new items are documented there):
the model is loaded and compiled once, then sessions are answered `--batch_size` at a time (a file) or
one by one as lines arrive (`--sessions -`, standard input; compiled for one session by default). Input lines are canonical sessions
(`{"session_id": ..., "items": [item ids in click order]}`). Each good line gets
`{"session_id", "model", "unknown_items", "recommendations": [{item_id, title, score, probability}]}`;
ids unknown to the items are listed under "unknown_items" and left out, and a session with no known
item gets an "error" field instead of recommendations. A bad line (not UTF-8, malformed JSON, a
missing or mistyped field) gets `{"line": N, "error": "..."}` and the next lines are still answered.

The model defaults to `tpad`, the method; the other neural rows (ablations, ID-only and classic-recipe
models) are comparison rows, served only when named. A model whose training did not finish is not
served. Without `--config` the run's own DIR/config.json is read.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from tpad_jax import cli
from tpad_jax import recommender as recommender_lib
from tpad_jax import rows
from tpad_jax.data import raw

DEFAULT_MODEL = recommender_lib.DEFAULT_MODEL


def session_lines(stream, name: str = "<stdin>"):
    """Yields (line number, session dict or an error message) for each non-blank line of a byte stream."""
    for number, line in enumerate(stream, start=1):
        record = raw.parse_json_line(line, name, number)
        if record is None:
            continue
        if isinstance(record, raw.RawFormatError):
            yield number, record.message
        elif "session_id" not in record or record["session_id"] is None:
            yield number, "field 'session_id': missing"
        else:
            try:
                recommender_lib.parse_session(record)
            except cli.UserError as error:
                yield number, str(error)
                continue
            yield number, record


def answer(recommender, lines, top_k: int, exclude_seen: bool, chunk: int):
    """Yields one output record per item of `lines` (from `session_lines`), in order, `chunk` good
    sessions per call of the recommender."""
    pending = []

    def flush():
        results = recommender.recommend([record for _, record in pending], top_k, exclude_seen)
        for (_, record), result in zip(pending, results):
            yield {"session_id": record["session_id"], "model": recommender.name, **result}
        pending.clear()

    for number, record in lines:
        if isinstance(record, str):
            yield from flush()
            yield {"line": number, "error": record}
            continue
        pending.append((number, record))
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def recommend(config, workdir: str, sessions_path: str, top_k: int, name: str = DEFAULT_MODEL,
              exclude_seen: bool = True, new_items: str | None = None, batch_size: int | None = None):
    """Yields one output record (a dict) per non-blank line of `sessions_path` ("-": standard input).

    `batch_size` None: 1 for standard input, answered line by line (a smaller compiled shape answers one
    session about 5x sooner on the default catalogue: benchmarks/RESULTS.md), else 64.
    """
    if batch_size is None:
        batch_size = 1 if sessions_path == "-" else recommender_lib.DEFAULT_BATCH_SIZE
    recommender = recommender_lib.Recommender.from_workdir(workdir, name, config, batch_size)
    if new_items:
        recommender.add_items(new_items)
    recommender.check_k(top_k)
    if sessions_path == "-":
        yield from answer(recommender, session_lines(sys.stdin.buffer), top_k, exclude_seen, chunk=1)
        return
    try:
        stream = open(sessions_path, "rb")  # noqa: SIM115  (closed below; the generator reads it lazily)
    except OSError as error:
        raise cli.UserError(f"{sessions_path}: {error.strerror}") from error
    with stream:
        yield from answer(recommender, session_lines(stream), top_k, exclude_seen, chunk=batch_size)


def main():
    f = flags.FLAGS
    for record in recommend(f.config, f.workdir, f.sessions, f.top_k, f.model, f.exclude_seen, f.new_items,
                            f.batch_size):
        print(json.dumps(record, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so tests can import this module next to other launchers.
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg); default: the "
                                    "run's DIR/config.json.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory holding the trained models (DIR/msbr/).")
    flags.DEFINE_string("sessions", None, "Canonical sessions.jsonl to recommend for; - reads standard input.")
    flags.DEFINE_integer("top_k", 20, "Recommendations per session (1 to the number of items).")
    flags.DEFINE_bool("exclude_seen", True, "Leave the session's own items out of its recommendations.")
    flags.DEFINE_string("new_items", None, "Items outside the catalogue to recommend too: a canonical "
                        "items.jsonl, or a directory written by launch/embed_items.py.")
    flags.DEFINE_integer("batch_size", None, "Sessions per compiled call (default: 1 for standard input, "
                         f"{recommender_lib.DEFAULT_BATCH_SIZE} for a file).")
    flags.DEFINE_string("model", DEFAULT_MODEL, f"A trained neural model ({', '.join(rows.names(rows.neural()))}).")
    flags.mark_flags_as_required(["workdir", "sessions"])
    cli.run(main)
