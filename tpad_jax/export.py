"""Stage 3: run the Knowledge-MLLM over every item and write the TPAD item representations.

Writes `DIR/<name>/item_embeddings.npy` (float32 [N, d]), `item_ids.json` (row -> item id) and
`export_meta.json` (config, checkpoint step, dims, dataset fingerprint and the `provenance` record of
what made it). The same model and tables give the same arrays: the computation is deterministic and
padded to a fixed batch shape.

A model whose state lives on a device mesh (every trained stage's) is exported data-parallel: each chunk
of items is split over the mesh's batch axes, so every device, and so every process, embeds its own share
of the catalogue instead of all of it; the result is one logical [N, d] array, gathered to every host,
which process 0 writes. When the item tables are split by rows over those same axes (the default rules),
each device's share is the rows it holds (`_embed_own_rows`), so no table row crosses devices.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tpad_jax import layout
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.workdir import atomic_open

EMBEDDINGS_FILE = "item_embeddings.npy"
IDS_FILE = "item_ids.json"
META_FILE = "export_meta.json"


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _embed_all(graphdef, state, num_items, batch_size, row_sharding):
    """e_K of all N items in one call: fixed-size chunks under `lax.map`, the last wrapping around.

    One call instead of one per chunk: the host dispatches and waits once (on 2 shared cores each
    round trip left the device idle; this runs the base export about a fifth faster). `row_sharding`
    (or None) splits each chunk's rows over the devices. Rows past `num_items` (table padding) are not
    embedded.
    """
    model = nnx.merge(graphdef, state)
    num_chunks = -(-num_items // batch_size)
    rows = (jnp.arange(num_chunks * batch_size, dtype=jnp.int32) % num_items).reshape(num_chunks, batch_size)

    def embed(chunk):
        if row_sharding is not None:
            chunk = jax.lax.with_sharding_constraint(chunk, row_sharding)
        return tpad_lib.item_forward(model, chunk)[1]

    e_k = jax.lax.map(embed, rows)
    return e_k.reshape(-1, e_k.shape[-1])[:num_items].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _embed_own_rows(graphdef, state, num_items, block_chunk, mesh, axes):
    """e_K of all N items when the item tables are split by rows over the mesh axes `axes`, as the
    batch is: every device embeds the rows it holds, `block_chunk` of them per step.

    Step c gives device d its rows d * B + c * block_chunk + [0, block_chunk) (B: rows per table shard),
    gathered from its own table shard under `shard_map`. No table row crosses devices (or processes):
    only the [N, d] result is gathered at the end.
    """
    model = nnx.merge(graphdef, state)
    tables = tpad_lib.table_rows_of(model, slice(None))
    shards = math.prod(mesh.shape[axis] for axis in axes)
    block = model.tables["tokens"][...].shape[0] // shards
    steps = -(-block // block_chunk)
    spec = PartitionSpec(axes)
    gather = jax.shard_map(lambda local, index: {name: value[index] for name, value in local.items()},
                           mesh=mesh, in_specs=(spec, spec), out_specs=spec)

    def embed(step):
        local = jnp.minimum(step * block_chunk + jnp.arange(block_chunk), block - 1)  # the last step wraps
        index = jax.lax.with_sharding_constraint(jnp.tile(local, shards), NamedSharding(mesh, spec))
        return tpad_lib.item_forward_of(model, gather(tables, index))[1]

    e_k = jax.lax.map(embed, jnp.arange(steps))  # [steps, shards * block_chunk, d]
    e_k = e_k.reshape(steps, shards, block_chunk, -1).transpose(1, 0, 2, 3).reshape(shards, -1, e_k.shape[-1])
    return e_k[:, :block].reshape(-1, e_k.shape[-1])[:num_items].astype(jnp.float32)


def _row_axes(state, mesh):
    """The mesh axes the item tables' rows are split over when they are the batch axes, else None."""
    tokens = state["tables"]["tokens"].get_value()
    sharding = getattr(tokens, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    axes = sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if axes and axes == mesh_lib.batch_axes(mesh) else None


def state_mesh(state):
    """The mesh the arrays of `state` live on (None: plain single-device arrays)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def item_embeddings(model, batch_size: int, num_items: int | None = None) -> np.ndarray:
    """e_K for the first `num_items` rows of `model`'s tables, in fixed-size padded batches: float32 [N, d].

    `num_items` None: the model's catalogue (`cfg.num_items`) when the tables have its `cfg.rows` rows
    (rows past it are padding), else every row (`new_items.py` gives a trained model tables of other
    items). On a mesh, `batch_size` is rounded up to a multiple of the batch shards, each embedding its
    part of every chunk (its own table rows, when the tables are split as the batch is); every process
    gets the whole array.
    """
    if num_items is None:
        rows = model.tables["item_pos"][...].shape[0]
        num_items = model.cfg.num_items if rows == model.cfg.rows else rows
    graphdef, state = nnx.split(model)
    mesh, row_sharding = state_mesh(state), None
    if mesh is not None:
        shards = math.prod(mesh.shape[axis] for axis in mesh_lib.batch_axes(mesh))
        if shards > 1:
            batch_size = -(-batch_size // shards) * shards
            row_sharding = mesh_lib.data_sharding(mesh)
    axes = _row_axes(state, mesh) if row_sharding is not None else None
    if axes:  # tables split by rows as the batch is: every device embeds the rows it holds
        embeddings = _embed_own_rows(graphdef, state, num_items, batch_size // shards, mesh, axes)
    else:
        embeddings = _embed_all(graphdef, state, num_items, batch_size, row_sharding)
    return mesh_lib.host_values(embeddings)  # gathered where other processes hold parts of it


def write_export(out_dir: str, embeddings: np.ndarray, item_ids, meta: dict) -> None:
    """Writes the three files of an export, each atomically, export_meta.json last.

    The old export_meta.json goes first, so an export cut short reads as incomplete (`is_complete`),
    never as new arrays under the old record.
    """
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    with atomic_open(os.path.join(out_dir, EMBEDDINGS_FILE), "wb") as f:
        np.save(f, embeddings.astype(np.float32))
    with atomic_open(os.path.join(out_dir, IDS_FILE)) as f:
        json.dump(list(item_ids), f)
    meta = dict(meta, num_items=int(embeddings.shape[0]), dim=int(embeddings.shape[1]))
    with atomic_open(meta_path) as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)


def is_complete(out_dir: str) -> bool:
    """Whether `out_dir` holds a whole export (its export_meta.json is written last)."""
    return all(os.path.exists(os.path.join(out_dir, name)) for name in (EMBEDDINGS_FILE, IDS_FILE, META_FILE))


def load_meta(out_dir: str) -> dict:
    """The export_meta.json of an export."""
    with open(os.path.join(out_dir, META_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_export(out_dir: str):
    """(embeddings [N, d] float32, item_ids list, meta dict)."""
    embeddings = np.load(os.path.join(out_dir, EMBEDDINGS_FILE))
    with open(os.path.join(out_dir, IDS_FILE)) as f:
        item_ids = json.load(f)
    return embeddings, item_ids, load_meta(out_dir)


def retrieval_ranks(embeddings: np.ndarray, data, split: str = "test", batch_size: int = 512) -> np.ndarray:
    """Next-item retrieval by embedding similarity: the target's rank among all items by cosine to the
    last item's vector, per example of `split` (int32 [num_examples]).

    A direct probe of what an export learned, with no downstream model in between.
    """
    unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-8)
    table = jnp.asarray(unit)
    prefixes, targets = data.examples(split)

    def score(chunk):
        last = jnp.asarray(np.array([prefix[-1] for prefix in chunk], dtype=np.int32))
        return table[last] @ table.T

    return metrics_lib.rank_targets(score, prefixes, targets, batch_size)


def read_exports(workdir: str) -> dict:
    """{variant: (embeddings, item_ids)} of every export DIR/export* of a run; exports of other prepared data
    than DIR/data/prepared are skipped, with a line saying so."""
    fingerprint_path = os.path.join(layout.prepared_dir(workdir), "fingerprint.txt")
    current = None
    if os.path.exists(fingerprint_path):
        with open(fingerprint_path, encoding="utf-8") as f:
            current = f.read().strip()
    exports = {}
    for entry in sorted(os.listdir(workdir)):
        directory = os.path.join(workdir, entry)
        if not (layout.is_export_name(entry) and os.path.exists(os.path.join(directory, EMBEDDINGS_FILE))):
            continue
        embeddings, item_ids, meta = load_export(directory)
        name = meta.get("variant") or os.path.basename(directory)
        if current is not None and meta.get("dataset_fingerprint") not in (None, current):
            print(f"skipped {directory}: exported from other prepared data than DIR/data/prepared")
            continue
        exports[name] = (embeddings, item_ids)
    return exports
