"""Embeds items outside a run's catalogue as a model's export was made and writes them as an export.

Usage:
  python launch/embed_items.py --workdir runs/base --items new/items.jsonl --out new/export \
      [--model tpad] [--config configs/tpad_base.py]

`--items` is a canonical items.jsonl (`{"item_id", "title", "category" (optional), "image" (optional,
relative to the file's directory and inside it)}`); a bad record stops with `file:line: field '...'`.
The K that runs is the one that wrote the export `--model` reads (DIR/export for `tpad`), restored
from its checkpoint; the run's own tokenizer splits words it never saw into known pieces. A model that
reads the MiniLM export (`transformer+minilm`) embeds with MiniLM, from title and category.
`--out` gets item_embeddings.npy, item_ids.json and export_meta.json (`tpad_jax/new_items.py`); it is
never the run's own export. Serve the items next to the catalogue with
`launch/recommend.py --new_items OUT` (or `Recommender.add_items(OUT)`). Without `--config` the run's
own DIR/config.json is read.
"""

from absl import flags
from ml_collections import config_flags

from tpad_jax import cli, new_items, rows
from tpad_jax import recommender as recommender_lib


def main():
    f = flags.FLAGS
    config = f.config if f.config is not None else recommender_lib.run_config(f.workdir)
    added = new_items.embed_new_items(config, f.workdir, f.items, f.out, f.model)
    print(f"{len(added.item_ids)} items embedded ({added.embeddings.shape[1]} dims) into {f.out}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg); default: the "
                                    "run's DIR/config.json.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory holding the trained towers and exports.")
    flags.DEFINE_string("items", None, "Canonical items.jsonl of the items to embed.")
    flags.DEFINE_string("out", None, "Directory to write the new items' export to (outside DIR/export*).")
    flags.DEFINE_string("model", recommender_lib.DEFAULT_MODEL,
                        "The neural model whose export's encoder embeds "
                        f"({', '.join(rows.names(rows.neural()))}).")
    flags.mark_flags_as_required(["workdir", "items", "out"])
    cli.run(main)
