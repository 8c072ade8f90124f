"""Parameters, memory per device and FLOPs of a TPAD stage-2 step at several device counts, without
allocating the model.

    python benchmarks/scale_plan.py --config configs/tpad_llava7b.py --devices 8,64,256 \
        --mesh 1,8,1 --mesh 4,16,1 --mesh 8,8,4

`--mesh data,fsdp,tensor` is given once per device count (default: `config.mesh.shape` resolved for
each count). The model is `nnx.eval_shape`d from the config (`mllm.config_from` + `tpad.TPADConfig`);
nothing is compiled, since `compiled.memory_analysis()` needs the devices themselves. Instead:

params     every parameter's logical axes are resolved with the config's rule set
           (`rules.logical_to_spec`) and each dimension divided (rounded up) by the mesh axes it is
           split over. Each weight counts in the dtype the model stores it in: the frozen base in
           `model.base_param_dtype` (bf16 in the 7B preset), trainable ones (LoRA, projectors, heads,
           critic) in float32.
optimizer  AdamW mu + nu in float32 over the trainable parameters, sharded like them (8 B / param).
grads      float32 gradients of the trainable parameters, sharded like them (4 B / param).
tables     the per-item tables (`ItemTable`: prompts, frozen ViT features) for `--num_items` items;
           their rows are split like any variable by their logical axis `items` (the batch axes).
activations of one stage-2 step (see `activation_bytes`): three LM passes held until the backward:
           the Transfer tower over B session prompts (length Ls), K over the B (S + 1) shown and target
           items' prompts (length Li) and the keep term's Bk item prompts. With `model.remat` each layer
           keeps only its input: layers x tokens/dev x D x bytes, where tokens/dev divides by the mesh
           axes of `batch` (data x fsdp) and D by those of `embed` left after `batch` (none under
           `default`); plus one layer's recomputed internals for the largest pass (q, k, v, o, norms:
           (4D + (2Hq + 2Hkv) hd) B, SwiGLU 3F B, both split by `tensor`; scores + probabilities
           2 Hq L^2 x 4 B per sequence, split by `tensor`), plus float32 logits and log-softmax
           (2 x V x 4 B per token, V split by `tensor`) of the two passes with a generation loss.
           Without remat every layer keeps its internals.
gathered   frozen LM weights all-gathered over the batch axes (FSDP): two layers in flight (one
           computing, one prefetched), lm_head and the embedding table, each still split by `tensor`.
FLOPs      per token of a pass over the LM: 2 P_layers forward + 2 P_layers for the activation
           gradients (the base is frozen: no weight gradients) + 2 P_layers recompute with remat;
           6 P_lora (+ 2 P_lora with remat) for the tower's LoRA; attention 4 n_layers L Hq hd
           forward, x (3 + remat); 4 D V per logit token. The ViT costs nothing per step: its pooled
           features are precomputed into the item tables.
"""

import dataclasses
import math
import re
import types

import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from tpad_jax.data import prompts
from tpad_jax.models import mllm, tpad
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import optim, stages

GIB = 2**30
DEVICE_MEMORY_GIB = (16, 32, 80)
NEXT_WORD_TOKENS = 2  # " Next:" in the Llama and Qwen2 tokenizers
OPTIMIZER_BYTES, GRAD_BYTES = 8, 4


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One variable of the abstract model: where it lives, its shape, logical axes and role."""

    path: str
    shape: tuple
    names: tuple
    itemsize: int  # storage bytes per element, as the model stores it
    trainable: bool
    table: bool


def tpad_config(config, num_items=1):
    """The TPADConfig a run of `config` builds, with the preset's own vocabulary and `num_items` rows."""
    mllm_cfg = mllm.config_from(config.model, vocab_size=config.data.tokenizer_vocab_size,
                                image_size=config.data.image_size)
    n_img = min(config.data.item_visual_tokens, mllm_cfg.vision.num_features) if mllm_cfg.vision else 0
    return tpad.TPADConfig(mllm=mllm_cfg, embed_dim=config.model.embed_dim, image_token_id=0,
                           num_items=num_items,
                           item_prompt_length=prompts.item_prompt_length(n_img, config.data.max_item_tokens),
                           item_visual_tokens=n_img)


def leaves(module, model_config):
    """Every variable of `module` (abstract or concrete) as a `Leaf`."""
    # The production filter decides what stage 2 trains; the plan only counts it.
    wrt = optim.trainable_filter(stages.STAGE2_GROUPS, full_finetune=model_config.full_finetune,
                                 train_projector=model_config.train_projector)
    trainable_paths = {key for key, _ in nnx.to_flat_state(nnx.state(module, wrt))}
    out = []
    for key, variable in nnx.to_flat_state(nnx.state(module)):
        path = optim.path_string(key)
        value = variable.get_value()
        table = isinstance(variable, tpad.ItemTable)
        trainable = key in trainable_paths
        names = variable.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        out.append(Leaf(path, tuple(value.shape), tuple(names), jnp.dtype(value.dtype).itemsize, trainable,
                        table))
    return out


def parameter_counts(all_leaves):
    """Parameter counts by part: per tower (LoRA, projector, heads), the shared base (ViT, LM), total."""
    counts = {}
    for leaf in all_leaves:
        if leaf.table:
            continue
        part = next(name for name, pattern in tpad.GROUP_PATTERNS.items() if re.search(pattern, leaf.path))
        if part == "base":
            piece = "vision" if "/vision/" in leaf.path else "lm"
        else:
            piece = next((p for p in ("lora", "projector") if f"/{p}/" in leaf.path), "heads")
        counts[(part, piece)] = counts.get((part, piece), 0) + math.prod(leaf.shape)
    order = ("base", tpad.KNOWLEDGE, tpad.TRANSFER, "critic", "vision", "lm", "lora", "projector", "heads")
    counts = dict(sorted(counts.items(), key=lambda item: tuple(order.index(k) for k in item[0])))
    counts[("total", "")] = sum(counts.values())
    counts[("trainable", "")] = sum(math.prod(leaf.shape) for leaf in all_leaves if leaf.trainable)
    return counts


def shard_divisors(names, rules, mesh_sizes):
    """How many pieces each dimension with logical axes `names` is split into on a mesh of `mesh_sizes`."""
    spec = rules_lib.logical_to_spec(names, rules)
    divisors = []
    for axes in spec:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        divisors.append(math.prod(mesh_sizes.get(axis, 1) for axis in axes))
    return divisors


def sharded_elements(shape, names, rules, mesh_sizes):
    """Elements of one device's shard: each dimension divided, rounded up, by its mesh axes."""
    return math.prod(-(-size // div) for size, div in zip(shape, shard_divisors(names, rules, mesh_sizes)))


def state_bytes(all_leaves, rules, mesh_sizes):
    """Bytes per device of params, optimizer state, gradients and item tables."""
    out = dict(params=0, optimizer=0, grads=0, tables=0)
    for leaf in all_leaves:
        elements = sharded_elements(leaf.shape, leaf.names, rules, mesh_sizes)
        if leaf.table:
            out["tables"] += elements * leaf.itemsize
            continue
        out["params"] += elements * leaf.itemsize
        if leaf.trainable:
            out["optimizer"] += elements * OPTIMIZER_BYTES
            out["grads"] += elements * GRAD_BYTES
    return out


def stage2_passes(config, tpad_cfg):
    """The LM passes of one stage-2 step: (name, sequences, length, with logits)."""
    d, s2 = config.data, config.stage2
    session_length = prompts.session_prompt_length(
        types.SimpleNamespace(next_word=(0,) * NEXT_WORD_TOKENS), d.visual_tokens_per_item,
        d.max_title_tokens, d.max_prompt_items)
    passes = [("transfer", s2.batch_size, session_length, True),
              ("knowledge", s2.batch_size * (d.max_prompt_items + 1), tpad_cfg.item_prompt_length, False)]
    if s2.keep_weight:
        passes.append(("keep", s2.keep_batch_size, tpad_cfg.item_prompt_length, True))
    return passes


def gathered_weight_bytes(all_leaves, rules, mesh_sizes):
    """Bytes of frozen LM weights gathered whole over the batch axes: two layers in flight, and lm_head.

    A batch-parallel step all-gathers each FSDP-sharded weight before using it; XLA overlaps the next
    layer's gather with this layer's compute, hence two layers.
    """
    batch_axes = rules_lib.logical_to_spec(("batch",), rules)[0]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    unsplit = {axis: 1 if axis in batch_axes else size for axis, size in mesh_sizes.items()}
    total = 0
    for leaf in all_leaves:
        if leaf.trainable or leaf.table:
            continue
        whole = sharded_elements(leaf.shape, leaf.names, rules, unsplit)
        if whole == sharded_elements(leaf.shape, leaf.names, rules, mesh_sizes):
            continue  # not split by the batch axes: nothing to gather
        if re.search(r"/lm/layers/", leaf.path):
            total += 2 * whole // leaf.shape[0] * leaf.itemsize
        elif re.search(r"/lm/(lm_head|embed)/", leaf.path):
            total += whole * leaf.itemsize
    return total


def activation_bytes(config, tpad_cfg, rules, mesh_sizes):
    """Activation bytes per device of one stage-2 step (the formula of the module docstring)."""
    lm = tpad_cfg.mllm.lm
    act = jnp.dtype(lm.dtype).itemsize
    batch_div = shard_divisors(("batch",), rules, mesh_sizes)[0]
    _, _, embed_div = shard_divisors(("batch", "length", "embed"), rules, mesh_sizes)
    tensor = shard_divisors(("mlp",), rules, mesh_sizes)[0]
    vocab_div = shard_divisors(("vocab",), rules, mesh_sizes)[0]

    def layer_internals(tokens, sequences, length):
        width = 4 * lm.hidden_size / embed_div + (
            (2 * lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim + 3 * lm.mlp_size) / tensor
        scores = sequences * 2 * lm.num_heads * length**2 * 4 / tensor
        return tokens * width * act + scores

    total, peak_layer = 0.0, 0.0
    for _, sequences, length, with_logits in stage2_passes(config, tpad_cfg):
        per_device = -(-sequences // batch_div)
        tokens = per_device * length
        if lm.remat:
            total += lm.num_layers * tokens * lm.hidden_size / embed_div * act
            peak_layer = max(peak_layer, layer_internals(tokens, per_device, length))
        else:
            total += lm.num_layers * layer_internals(tokens, per_device, length)
        if with_logits:
            total += tokens * 2 * lm.vocab_size / vocab_div * 4
    return total + peak_layer


def layer_matmul_params(all_leaves):
    """Parameters of the LM's layer kernels: each costs 2 FLOPs per token in a forward pass."""
    pattern = re.compile(r"(^|/)lm/layers/.*kernel$")
    return sum(math.prod(leaf.shape) for leaf in all_leaves if pattern.search(leaf.path))


def attention_flops_per_token(lm, length):
    """Forward FLOPs per token of the score and value matmuls over a whole sequence of `length`."""
    return 4 * lm.num_layers * length * lm.num_heads * lm.head_dim


def step_flops(config, tpad_cfg, all_leaves):
    """FLOPs of one stage-2 step over the whole mesh (the formula of the module docstring)."""
    lm = tpad_cfg.mllm.lm
    layer_params = layer_matmul_params(all_leaves)
    lora_per_tower = sum(math.prod(leaf.shape) for leaf in all_leaves
                         if re.search(r"towers/towers/knowledge/lora/", leaf.path))
    recompute = int(lm.remat)
    total = 0.0
    for _, sequences, length, with_logits in stage2_passes(config, tpad_cfg):
        per_token = ((4 + 2 * recompute) * layer_params + (6 + 2 * recompute) * lora_per_tower
                     + (3 + recompute) * attention_flops_per_token(lm, length))
        if with_logits:
            per_token += 4 * lm.hidden_size * lm.vocab_size
        total += sequences * length * per_token
    return total


def checkpoint_bytes(all_leaves):
    """Bytes of one stage-2 checkpoint in all (over every device): `saved`, what `loop.checkpointed` keeps
    (trainable parameters and their AdamW state), and `whole`, the whole state that checkpoints held
    before it (plus the frozen base and the item tables). Scalars (step, counts, RNG) left out."""
    trainable = sum(math.prod(leaf.shape) for leaf in all_leaves if leaf.trainable)
    saved = sum(math.prod(leaf.shape) * leaf.itemsize for leaf in all_leaves if leaf.trainable)
    saved += trainable * OPTIMIZER_BYTES
    frozen = sum(math.prod(leaf.shape) * leaf.itemsize for leaf in all_leaves if not leaf.trainable)
    return {"saved": saved, "whole": saved + frozen}


def plan_row(config, tpad_cfg, all_leaves, mesh_shape):
    """One table row: the memory per device and FLOPs of a stage-2 step on `mesh_shape`."""
    mesh_sizes = dict(zip(config.mesh.axes, mesh_shape))
    rules = rules_lib.get_rules(config.mesh.rules)
    memory = state_bytes(all_leaves, rules, mesh_sizes)
    memory["activations"] = activation_bytes(config, tpad_cfg, rules, mesh_sizes)
    memory["gathered"] = gathered_weight_bytes(all_leaves, rules, mesh_sizes)
    memory["total"] = sum(memory.values())
    batch_div = shard_divisors(("batch",), rules, mesh_sizes)[0]
    return dict(devices=math.prod(mesh_shape), mesh=tuple(mesh_shape), memory=memory,
                batch_ok=all(size % batch_div == 0 for size in (config.stage1.batch_size,
                                                                 config.stage2.batch_size)),
                batch_shards=batch_div, flops=step_flops(config, tpad_cfg, all_leaves))


def markdown(rows, axes):
    """The plan as a Markdown table, one row per device count."""
    head = ["devices", "mesh (" + ", ".join(axes) + ")", "batch shards", "params", "optimizer", "grads",
            "tables", "activations", "gathered", "total GiB/device",
            *(f"fits {g} GiB" for g in DEVICE_MEMORY_GIB), "TFLOPs/step"]
    head_keys = ("params", "optimizer", "grads", "tables", "activations", "gathered", "total")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        mem = {key: value / GIB for key, value in row["memory"].items()}
        fits = ["yes" if row["batch_ok"] and mem["total"] <= g else "no" for g in DEVICE_MEMORY_GIB]
        shards = f"{row['batch_shards']}" + ("" if row["batch_ok"] else " (batch not divisible)")
        cells = [str(row["devices"]), "(" + ", ".join(map(str, row["mesh"])) + ")", shards,
                 *(f"{mem[key]:.2f}" for key in head_keys),
                 *fits, f"{row['flops'] / 1e12:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts_markdown(counts):
    """Parameter counts by part as a Markdown table."""
    lines = ["| part | piece | parameters |", "|---|---|---|"]
    lines += [f"| {part} | {piece} | {count:,} |" for (part, piece), count in counts.items()]
    return "\n".join(lines)


def mesh_shapes(config, device_counts, meshes):
    """The mesh shape for each device count: given explicitly, or `config.mesh.shape` resolved."""
    if meshes and len(meshes) != len(device_counts):
        raise ValueError(f"--mesh: {len(meshes)} meshes for {len(device_counts)} device counts")
    if not meshes:
        return [mesh_lib.resolve_mesh_shape(config.mesh.shape, n) for n in device_counts]
    shapes = [tuple(int(size) for size in mesh.split(",")) for mesh in meshes]
    for n, shape in zip(device_counts, shapes):
        if math.prod(shape) != n:
            raise ValueError(f"--mesh {shape}: uses {math.prod(shape)} devices, not {n}")
    return shapes


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).")
    flags.DEFINE_list("devices", ["8", "64", "256"], "Device counts, one table row each.")
    flags.DEFINE_multi_string("mesh", [], "data,fsdp,tensor; once per device count (default: config.mesh).")
    flags.DEFINE_integer("num_items", 20000, "Catalogue size for the item tables.")
    flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config, args = flags.FLAGS.config, flags.FLAGS
    tpad_cfg = tpad_config(config, num_items=args.num_items)
    abstract = nnx.eval_shape(lambda: tpad.TPAD(tpad_cfg, rngs=nnx.Rngs(0)))
    all_leaves = leaves(abstract, config.model)
    device_counts = [int(n) for n in args.devices]
    rows = [plan_row(config, tpad_cfg, all_leaves, shape)
            for shape in mesh_shapes(config, device_counts, args.mesh)]
    passes = ", ".join(f"{name} {seqs} x {length}"
                       for name, seqs, length, _ in stage2_passes(config, tpad_cfg))
    print(counts_markdown(parameter_counts(all_leaves)))
    print(f"\nstage-2 step: LM passes (sequences x length) {passes}; rules {config.mesh.rules!r}; "
          f"{args.num_items} items in the tables; base stored in {config.model.base_param_dtype}\n")
    print(markdown(rows, config.mesh.axes))
    checkpoint = checkpoint_bytes(all_leaves)
    print(f"\none stage-2 checkpoint: {checkpoint['saved'] / GIB:.2f} GiB (trainable parameters and AdamW "
          f"state); the whole state with the frozen base and the tables of {args.num_items} items, which "
          f"checkpoints held before: {checkpoint['whole'] / GIB:.2f} GiB")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
