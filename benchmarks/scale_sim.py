"""The catalogue-scale simulation: synthetic catalogues of 10k-1M items through prepare -> export ->
full-ranking evaluation, with the wall time and peak RSS of every phase and process and the per-device
bytes of item data.

    python benchmarks/scale_sim.py --items 10000,100000,1000000 --out OUT

Each catalogue is written in the canonical format (`items.jsonl`, `sessions.jsonl`, `images/`) by a
simple generator (not the embedded synthetic process, whose next-item oracle is quadratic in the items):
item i gets a title of three words drawn from its neighbourhood, one of 12 categories and a 16-px picture
(one of `--pictures` distinct files, so the disk holds thousands of files, not a million; every item
still decodes its own), and every item is clicked exactly `--clicks_per_item` times, in sessions of 2-6
items that walk between neighbouring rows (so the similarity probe has something to find).

Phases, each in fresh processes so its peak RSS is its own:
- generate: the raw catalogue (the user's data, not the pipeline; reported for scale only);
- prepare:  `prepared.load_or_prepare` (read, validate, protocol), the tokenizer, the TFDS item table;
- load:     the prepared splits loaded back and the train examples of every position, which every
            later phase starts with;
- export:   the tiny TPAD towers with random weights on the mesh: item tables split by rows over the
            devices, the frozen ViT's streamed pass, `export.item_embeddings` (data-parallel), the export
            files. Run on 8 virtual CPU devices in one process, and as 2 processes x 4 devices over
            127.0.0.1 (`--processes 2`);
- evaluate: full ranking of every test example against all items by e_K similarity
            (`export.retrieval_ranks`), HR@20 and MRR@20.
Per phase it prints (and writes to OUT/scale_sim.{jsonl,md}) wall seconds, peak RSS per process, and for
the export the bytes of item data held by one device (item tables, summed over that device's shards).
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

import train_step
from common import apply_overrides, default_workdir

ROOT = pathlib.Path(__file__).resolve().parent.parent
CATEGORIES = ("lamp", "chair", "table", "mug", "vase", "clock", "rug", "bag", "shoe", "hat", "scarf", "bottle")
WORDS = tuple(f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo") for b in
              ("ra", "ble", "ton", "dix", "pel", "mar", "ine", "ost"))  # 64 made-up words
OVERRIDES = {"data.min_item_count": 1, "data.image_size": 16, "data.max_item_tokens": 12,
             "eval.batch_size": 256}
SECTION = "Catalogue-scale simulation"


def log(message):
    print(f"[scale_sim {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(raw_dir: pathlib.Path, num_items: int, clicks_per_item: int, pictures: int, seed: int = 0):
    """Writes a canonical catalogue of `num_items` items into `raw_dir` (see the module docstring)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (raw_dir / "images").mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, size=(pictures, 3))
    for k in range(pictures):
        picture = np.zeros((16, 16, 3), np.uint8)
        picture[:] = colours[k]
        picture[4:12, 4:12] = 255 - colours[k]
        Image.fromarray(picture).save(raw_dir / "images" / f"p{k}.png")
    words = rng.integers(0, len(WORDS), size=num_items // 64 + 2)
    with open(raw_dir / "items.jsonl", "w") as f:
        for i in range(num_items):
            # Neighbouring rows share words: the title carries the walk's locality.
            title = " ".join(WORDS[w] for w in (words[i // 64], words[i // 64 + 1], (i * 7) % len(WORDS)))
            f.write(json.dumps({"item_id": f"i{i}", "title": title, "category": CATEGORIES[(i // 64) % 12],
                                "image": f"images/p{i % pictures}.png"}) + "\n")
    # Every item clicked exactly clicks_per_item times: each round deals a permutation out into sessions
    # whose items are then re-ordered as a walk between nearby rows.
    session = 0
    with open(raw_dir / "sessions.jsonl", "w") as f:
        for _ in range(clicks_per_item):
            order = np.argsort(np.arange(num_items) + rng.normal(0, 200, num_items))  # nearby rows together
            lengths = rng.integers(2, 7, size=num_items // 2 + 1)
            cuts = np.cumsum(lengths)
            cuts = cuts[cuts < num_items]
            for chunk in np.split(order, cuts):
                if len(chunk) < 2:
                    continue
                items = [f"i{i}" for i in chunk]
                f.write(json.dumps({"session_id": f"s{session}", "items": items,
                                    "timestamp": 1_600_000_000 + 60 * session}) + "\n")
                session += 1
    return session


def sim_config(raw_dir: str):
    """The tiny preset over the catalogue in `raw_dir`, with the simulation's OVERRIDES."""
    config = train_step.load_config(str(ROOT / "configs" / "tpad_base.py"), "tiny")
    config.data.raw_dir = raw_dir
    return apply_overrides(config, [f"{k}={v!r}" for k, v in OVERRIDES.items()])


def phase_prepare(workdir: str, raw_dir: str) -> dict:
    from tpad_jax import pretrained  # noqa: PLC0415
    from tpad_jax.data import prepared, tfds_builder, tokenizer as tokenizer_lib  # noqa: PLC0415

    config = sim_config(raw_dir)
    clock = Clock()
    data = prepared.load_or_prepare(config, workdir)
    clock.lap("read+protocol")
    tokenizer_lib.tokenizer_for(config, data, workdir, pretrained.tokenizer_source(config, workdir))
    clock.lap("tokenizer")
    tfds_builder.build_item_table(data, workdir)
    clock.lap("TFDS table")
    return {"items": data.num_items, "test_examples": len(data.examples("test")[1]), "detail": clock.summary()}


def phase_load(workdir: str, raw_dir: str) -> dict:
    """What every later phase starts with: the prepared splits loaded, then the train examples of every
    position (the input of stage 2 and of the downstream rows)."""
    from tpad_jax.data import pipeline, prepared  # noqa: PLC0415

    config = sim_config(raw_dir)
    clock = Clock()
    data = prepared.load_or_prepare(config, workdir)
    clock.lap("load")
    examples = pipeline.SessionExamples.every_position(data.train)
    clock.lap("train examples")
    return {"items": data.num_items, "detail": f"{clock.summary()}; {len(examples)} train examples"}


def device_item_bytes(model) -> int:
    """Bytes of the item tables held by the first local device (its shards of every table)."""
    import jax  # noqa: PLC0415 (workers import JAX after setting their device count)

    device = jax.local_devices()[0]
    total = 0
    for array in model.tables.values():
        value = array[...]
        total += sum(shard.data.nbytes for shard in value.addressable_shards if shard.device == device)
    return total


def phase_export(workdir: str, raw_dir: str) -> dict:
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from tpad_jax import export  # noqa: PLC0415
    from tpad_jax.parallel import distributed, mesh as mesh_lib  # noqa: PLC0415
    from tpad_jax.train import inputs as inputs_lib  # noqa: PLC0415

    config = sim_config(raw_dir)
    clock = Clock()
    inputs = inputs_lib.build_inputs(config, workdir)
    clock.lap("inputs")
    model = mesh_lib.sharded_init(inputs.make_model, inputs.mesh, inputs.rules)
    planned = jax.tree.map(lambda x: x.sharding, nnx.state(model))
    clock.lap("model")
    with mesh_lib.activate(inputs.mesh, inputs.rules):
        inputs.initialize(model)
    nnx.update(model, jax.device_put(nnx.state(model), planned))  # a no-op when nothing moved
    clock.lap("ViT pass+tables")
    item_bytes = device_item_bytes(model)
    embeddings = export.item_embeddings(model, config.eval.batch_size)
    clock.lap("embed")
    if distributed.is_main_process():
        export.write_export(os.path.join(workdir, "export_sim"), embeddings, inputs.data.item_ids,
                            {"variant": "scale_sim"})
    clock.lap("write")
    return {"items": inputs.data.num_items, "devices": jax.device_count(), "device_item_bytes": item_bytes,
            "detail": clock.summary()}


class Clock:
    """Named laps of a phase."""

    def __init__(self):
        self.start, self.laps = time.perf_counter(), []

    def lap(self, name):
        now = time.perf_counter()
        self.laps.append(f"{name} {now - self.start:.0f} s")
        self.start = now

    def summary(self):
        return ", ".join(self.laps)


def phase_evaluate(workdir: str, raw_dir: str) -> dict:
    from tpad_jax import export  # noqa: PLC0415
    from tpad_jax.data import prepared  # noqa: PLC0415

    config = sim_config(raw_dir)
    clock = Clock()
    data = prepared.load_or_prepare(config, workdir)
    embeddings, _, _ = export.load_export(os.path.join(workdir, "export_sim"))
    clock.lap("load")
    ranks = export.retrieval_ranks(embeddings, data, "test", config.eval.batch_size)
    clock.lap("rank")
    return {"items": data.num_items, "test_examples": int(len(ranks)),
            "detail": f"{clock.summary()}; HR@20 {100 * np.mean(ranks < 20):.2f}, MRR@20 "
                      f"{100 * np.mean(np.where(ranks < 20, 1.0 / (ranks + 1), 0.0)):.2f}"}


PHASES = {"prepare": phase_prepare, "load": phase_load, "export": phase_export, "evaluate": phase_evaluate}


def worker(args) -> None:
    """One process of one phase: prints its result as the last JSON line."""
    if args.processes > 1:
        import jax  # noqa: PLC0415
        import ml_collections  # noqa: PLC0415

        from tpad_jax.parallel import distributed  # noqa: PLC0415

        jax.config.update("jax_num_cpu_devices", args.devices)
        distributed.maybe_initialize(ml_collections.ConfigDict({
            "coordinator": f"127.0.0.1:{args.port}", "num_processes": args.processes,
            "process_id": args.process_id}))
    clock = time.perf_counter()
    result = PHASES[args.phase](args.workdir, args.raw_dir)
    result.update(wall_s=round(time.perf_counter() - clock, 1), peak_rss_mb=round(peak_rss_mb()),
                  process=args.process_id)
    print(json.dumps(result), flush=True)


def run_phase(phase: str, workdir: pathlib.Path, raw_dir: pathlib.Path, devices: int, processes: int):
    """Runs `phase` as `processes` fresh processes of `devices` CPU devices each; (wall s, their JSON
    results)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if processes == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # Every export phase runs the ViT pass it measures: a run keeps the features on disk and reads
    # them back at its next start (tpad_jax/train/vision_cache.py), which would time a read instead.
    from tpad_jax import layout  # noqa: PLC0415  (the parent process stays without JAX)
    from tpad_jax.train import vision_cache  # noqa: PLC0415

    shutil.rmtree(workdir / layout.DATA / vision_cache.DIRECTORY, ignore_errors=True)
    port = _free_port()
    clock = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--phase", phase, "--workdir", str(workdir), "--raw_dir", str(raw_dir),
         "--devices", str(devices), "--processes", str(processes), "--process_id", str(i), "--port",
         str(port)], stdout=subprocess.PIPE, env=env, text=True) for i in range(processes)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - clock
    results = []
    for proc, output in zip(procs, outputs):
        if proc.returncode != 0:
            raise SystemExit(f"phase {phase} failed (exit {proc.returncode})")
        results.append(json.loads(output.strip().splitlines()[-1]))
    return wall, results


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="10000,100000,1000000", help="comma list of catalogue sizes")
    parser.add_argument("--out", default=default_workdir("scale_sim"),
                        help="catalogues, workdirs and the tables (default: under the system's temp dir)")
    parser.add_argument("--clicks_per_item", type=int, default=3)
    parser.add_argument("--pictures", type=int, default=4096)
    parser.add_argument("--layouts", default="1x4,1x8,2x4",
                        help="the export's runs: PROCESSES x CPU devices per process")
    parser.add_argument("--phases", default="prepare,load,export,evaluate", help="which phases to run")
    # Worker arguments (set by run_phase).
    parser.add_argument("--phase", choices=sorted(PHASES))
    parser.add_argument("--devices", type=int, default=1, help="CPU devices of each process")
    parser.add_argument("--workdir")
    parser.add_argument("--raw_dir")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.phase:
        return worker(args)
    out = pathlib.Path(args.out)
    rows = []
    for num_items in [int(n) for n in args.items.split(",")]:
        raw_dir, workdir = out / f"raw_{num_items}", out / f"work_{num_items}"
        if not (raw_dir / "sessions.jsonl").exists():
            clock = time.perf_counter()
            sessions = generate(raw_dir, num_items, args.clicks_per_item, args.pictures)
            rows.append({"items": num_items, "phase": "generate", "layout": "",
                         "wall_s": round(time.perf_counter() - clock, 1), "peak_rss_mb": round(peak_rss_mb()),
                         "detail": f"{sessions} sessions"})
            log(rows[-1])
        plan = [("prepare", (1, 1)), ("load", (1, 1))] + [("export", tuple(map(int, layout.split("x"))))
                                        for layout in args.layouts.split(",")]
        plan.append(("evaluate", (1, 1)))
        for phase, (processes, devices) in [step for step in plan if step[0] in args.phases.split(",")]:
            wall, results = run_phase(phase, workdir, raw_dir, devices, processes)
            first = results[0]
            rows.append({**first, "items": num_items, "phase": phase, "layout": f"{processes}x{devices}",
                         "wall_s": round(wall, 1),
                         "peak_rss_mb": " / ".join(str(r["peak_rss_mb"]) for r in results)})
            log(rows[-1])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scale_sim.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    columns = ("items", "phase", "layout", "wall_s", "peak_rss_mb", "device_item_bytes", "detail")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    (out / "scale_sim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
