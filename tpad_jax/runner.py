"""The whole method in order: prepare -> stage 1 -> stage 2 (+ ablations) -> export -> downstream -> report.

Every step reads what earlier steps wrote in the workdir, so any of them can be run alone and a re-run
resumes where the last one stopped (finished stages are restored, not retrained). A stage whose inputs
changed (the prepared data or the config keys that shape it; `provenance.py`) is moved to DIR/stale/ and
trained again, with one line saying so. One run at a time holds the workdir (`workdir.lock`).
"""

import contextlib
import json
import os
import time

import numpy as np

from tpad_jax import evaluate, export, layout, provenance, rows, sentence_features
from tpad_jax import seeds as seeds_lib
from tpad_jax.cli import UserError
from tpad_jax.data import prepared, readonly
from tpad_jax.downstream import scoring, selection
from tpad_jax.downstream import settings as row_settings
from tpad_jax import workdir as workdir_lib
from tpad_jax.eval import compare, plots, probe, report, significance
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.parallel import distributed
from tpad_jax.train import inputs as inputs_lib
from tpad_jax.train import loop, stages

def run(config, workdir: str, stage: str = "all") -> None:
    """Runs `stage` (prepare, 1, 2, export, msbr or all) of TPAD in `workdir`."""
    distributed.maybe_initialize(config.dist)
    os.makedirs(workdir, exist_ok=True)
    # Only the main process locks: the workdir is one run's, whatever number of processes it has.
    with workdir_lib.lock(workdir) if distributed.is_main_process() else contextlib.nullcontext():
        _run(config, workdir, stage)


def _run(config, workdir: str, stage: str) -> None:
    clock = time.perf_counter()
    # A downstream setting outside its choices stops the run now, not after the towers have trained.
    row_settings.check_rows(evaluate.configured_models(config), config)
    if distributed.is_main_process():
        with workdir_lib.atomic_open(layout.config_file(workdir)) as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    data = prepared.load_or_prepare(config, workdir)
    if not data.has_content:
        # Titles and images are what the towers read: an ID-only catalogue runs the ID rows and baselines.
        print(f"data: {data.num_items} items (ID only), {len(data.train)} train / {len(data.valid)} valid / "
              f"{len(data.test)} test sessions; split {data.stats.get('split', 'by time')}", flush=True)
        if stage in ("1", "2", "export"):
            raise UserError(f"--stage={stage}: {prepared.NO_CONTENT}; stages 1, 2 and export need titles or images")
        print(f"towers, stages 1-2 and exports skipped: {prepared.NO_CONTENT}; the ID rows and baselines run",
              flush=True)
        if stage in ("all", "msbr"):
            evaluate_all(config, workdir)
        return
    inputs = inputs_lib.build_inputs(config, workdir, data)
    print(f"data: {inputs.data.num_items} items, {len(inputs.data.train)} train / {len(inputs.data.valid)} "
          f"valid / {len(inputs.data.test)} test sessions; split {inputs.data.stats.get('split', 'by time')} "
          f"({time.perf_counter() - clock:.1f} s)", flush=True)
    if stage == "prepare":
        return
    needed = rows.needed_exports(evaluate.configured_models(config))
    models = train_towers(inputs, stage, [variant.name for variant in needed if variant.source in rows.TOWER_SOURCES])
    if stage in ("all", "export"):
        embeddings = write_exports(inputs, models)
        for variant in needed:
            if variant.source == rows.MINILM:
                embeddings[variant.name] = sentence_features.catalogue_embeddings(
                    inputs.config, inputs.workdir, inputs.data, variant.name)
            elif variant.source == rows.ATTRIBUTES:
                embeddings[variant.name] = write_attribute_export(inputs, variant.name)
        write_probe(inputs, embeddings)
    if stage in ("all", "msbr"):
        evaluate_all(config, workdir)
    print(f"done in {time.perf_counter() - clock:.0f} s; workdir {os.path.abspath(workdir)}", flush=True)


def train_towers(inputs, stage: str, variants) -> dict:
    """Trains (or restores) what `stage` needs; returns {export variant: model}."""
    if stage == "msbr":
        return {}
    models = {}
    if rows.RAW in variants:
        raw = inputs.make_model()
        inputs.initialize(raw)
        models[rows.RAW] = raw
    claim_stage(inputs, rows.STAGE1)
    stage1_model = stages.run_stage1(inputs)
    models[rows.STAGE1] = stage1_model
    if stage == "1":
        return models
    for variant in variants:
        if rows.export_variant(variant).source == rows.STAGE2:
            claim_stage(inputs, variant)
            models[variant] = stages.run_stage2(inputs, stage1_model, variant)
    return models


def claim_stage(inputs, variant: str) -> None:
    """Readies the directory of stage 1 or of a stage-2 variant for this run's inputs (`provenance.claim`)."""
    label = "stage 1" if variant == rows.STAGE1 else f"stage 2 ({variant})"
    record = provenance.stage_record(inputs.config, inputs.data.fingerprint, variant)
    provenance.claim(inputs.workdir, layout.stage_name(variant), record, label)


def write_exports(inputs, models: dict) -> dict:
    """Writes one export per trained variant; returns {variant: item embeddings}."""
    embeddings_of = {}
    for variant, model in models.items():
        embeddings = export.item_embeddings(model, inputs.config.eval.batch_size)
        if distributed.is_main_process():
            meta = {"variant": variant, "config": inputs.config.to_dict(),
                    "checkpoint_step": _checkpoint_step(inputs.workdir, variant),
                    "dataset_fingerprint": inputs.data.fingerprint,
                    "inputs": provenance.export_record(inputs.config, inputs.data.fingerprint, variant)}
            export.write_export(layout.export_dir(inputs.workdir, variant), embeddings,
                                inputs.data.item_ids, meta)
        embeddings_of[variant] = embeddings
    return embeddings_of


def write_probe(inputs, embeddings_of: dict) -> None:
    """Writes and prints the retrieval probe of every export of this run, the towers' and the frozen
    encoders' alike (MiniLM's is the bar a representation of real titles must pass, with no downstream)."""
    probe_rows = []
    for variant, embeddings in embeddings_of.items():
        ranks = export.retrieval_ranks(embeddings, inputs.data, "test", inputs.config.eval.batch_size)
        _, targets = inputs.data.examples("test")
        probe_rows += metrics_lib.slice_rows(f"probe:{variant}", ranks, inputs.data.cold_mask(targets), (20,))
    if probe_rows:
        provenance.claim_results(inputs.workdir, inputs.data.fingerprint)  # every process: it synchronizes
    if probe_rows and distributed.is_main_process():
        with workdir_lib.atomic_open(os.path.join(layout.results_dir(inputs.workdir), report.PROBE_FILE)) as f:
            json.dump(probe_rows, f, indent=1)
        print(_probe_table(probe_rows), flush=True)


def attribute_features(data) -> np.ndarray:
    """The true attributes of a synthetic catalogue's items (category, colour, material, style), one-hot,
    [N, 30] float32 in the prepared item order (UserError for a catalogue that is not synthetic)."""
    from tpad_jax.data import synthetic  # noqa: PLC0415  (only for the attribute vocabularies)

    if not probe.is_synthetic_catalogue(data.raw_dir):
        raise UserError(f"{data.raw_dir}: not a synthetic catalogue, so its items' true attributes are "
                        "unknown; the transformer+attributes row needs data.source=synthetic")
    item_ids, attributes = probe.synthetic_attributes(data.raw_dir)
    row_of = {item_id: row for row, item_id in enumerate(item_ids)}
    rows_ = np.array([row_of[item_id] for item_id in data.item_ids])
    sizes = {"category": len(synthetic.CATEGORIES), "colour": len(synthetic.COLOURS),
             "material": len(synthetic.MATERIALS), "style": len(synthetic.STYLES)}
    return np.concatenate([np.eye(size, dtype=np.float32)[attributes[name][rows_]]
                           for name, size in sizes.items()], axis=1)


def write_attribute_export(inputs, variant: str) -> np.ndarray:
    """Writes the export of `variant`, the true attributes (`attribute_features`), an upper bound, not a
    model; returns them."""
    out_dir = layout.export_dir(inputs.workdir, variant)
    record = provenance.export_record(inputs.config, inputs.data.fingerprint, variant)
    embeddings = attribute_features(inputs.data)
    if distributed.is_main_process():
        export.write_export(out_dir, embeddings, inputs.data.item_ids,
                            {"variant": variant, "dataset_fingerprint": inputs.data.fingerprint, "inputs": record})
    return embeddings


def _checkpoint_step(workdir: str, variant: str):
    if layout.stage_name(variant) is None:
        return 0
    return loop.final_step(layout.stage_dir(workdir, variant))


def _probe_table(probe_rows) -> str:
    """Markdown: next-item retrieval by e_K similarity (HR@20 / MRR@20) per export and slice."""
    table = {}
    for row in probe_rows:
        table.setdefault(row["model"], {})[(row["slice"], row["metric"])] = row["value"]
    lines = ["| export (probe) | HR@20 all | MRR@20 all | HR@20 cold | MRR@20 cold |",
             "|---|---|---|---|---|"]
    for model, values in table.items():
        cells = [values.get(key, float("nan")) for key in
                 (("all", "HR"), ("all", "MRR"), ("cold", "HR"), ("cold", "MRR"))]
        lines.append(f"| {model} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


def evaluate_all(config, workdir: str) -> list[dict]:
    """Baselines and downstream models of `config.eval.models` on the test split; writes the report."""
    results = evaluate.run(config, workdir, ",".join(evaluate.configured_models(config)))
    if distributed.is_main_process():
        records_of = {name: report.read_metric_records(os.path.join(workdir, name, "metrics.jsonl"))
                      for name in sorted(os.listdir(workdir)) if layout.is_stage_name(name)
                      and os.path.exists(os.path.join(workdir, name, "metrics.jsonl"))}
        results_dir = layout.results_dir(workdir)
        if records_of:
            plots.loss_curves(records_of, os.path.join(results_dir, "training_curves.png"))
        selections = report.read_epochs(workdir, evaluate.configured_models(config))
        if records_of or selections:
            plots.validation_curves(records_of, selections, os.path.join(results_dir, "validation_curves.png"))
    return results


def run_seeds(config, workdir: str, seeds, downstream_seeds: int = 0, downstream_models=()) -> str:
    """The whole pipeline once per seed in DIR/seed<s>/ (each resumes), then the seed table.

    `config.seed` drives tower initialization and batches, the stage-2 and downstream seeds; the data
    (`data.synthetic.seed`, the split) stays the same, so every seed ranks the same test examples.
    Writes DIR/results/pipeline_seeds.md and .csv; returns the Markdown.

    With `downstream_seeds` n > 0 the neural rows `downstream_models` (all of `eval.models` when empty)
    are trained again on each seed's exports with n more downstream seeds (`seeds.extra_downstream_seeds`,
    in DIR/seed<s>/seeds/), and the nested table (`significance.nested_table`) is added and written to
    DIR/results/pipeline_downstream_seeds.md and .csv: the downstream's own spread averaged out of each pipeline
    seed, and a test over pipeline seeds beside the one over sessions.
    """
    runs, probes, cold_mask, signature, times, runs_of = [], [], None, None, {}, {}
    ranked = seeds_lib.neural_rows(config)
    names = list(downstream_models) or ranked
    unknown = [name for name in names if name not in ranked]
    if downstream_seeds and unknown:  # before any tower trains: the nested table pairs them with these runs
        raise UserError(f"{', '.join(unknown)}: not a neural row of eval.models; other downstream seeds "
                        f"retrain rows the pipeline ranks ({', '.join(ranked)})")
    for seed in seeds:
        seeded = config.copy_and_resolve_references()
        seeded.seed = seed
        directory = layout.pipeline_seed_dir(workdir, seed)
        clock = time.perf_counter()
        run(seeded, directory)
        if signature is None:
            signature = compare.split_signature(directory)
        elif compare.split_signature(directory) != signature:
            raise ValueError(f"{directory}/data/prepared/splits.npz: seed {seed} was prepared on other data "
                             f"than seed {seeds[0]}; whole-pipeline seeds must share one split")
        ranks, cold_mask = report.read_ranks(os.path.join(layout.results_dir(directory), report.RANKS_FILE))
        runs.append(ranks)
        probe = workdir_lib.read_json(os.path.join(layout.results_dir(directory), report.PROBE_FILE))
        probes.append(probe or [])
        if downstream_seeds:
            runs_of[seed] = [{name: ranks[name] for name in names}] + _other_downstream_seeds(
                seeded, directory, names, downstream_seeds)
        times[seed] = time.perf_counter() - clock
    table = significance.seed_table(runs, cold_mask)
    fusion, weights = "", scoring.fusion_weights(config)
    if weights:  # the weight each content row chose, which only stdout would say otherwise
        models, metric = evaluate.configured_models(config), scoring.metric_label(scoring.fusion_metric(config))
        fusion = "\n" + significance.fusion_markdown(
            {seed: selection.chosen_fusion(layout.pipeline_seed_dir(workdir, seed), models, weights, metric)
             for seed in seeds}, seeds, metric)
    text = (significance.markdown(table, seeds) + "\n" + significance.probe_markdown(probes, seeds) + fusion
            + "\nWall time of this command per seed (a resumed seed only re-evaluates): "
            + ", ".join(f"seed {s} {t / 60:.1f} min" for s, t in times.items()) + "\n")
    if distributed.is_main_process():
        significance.write_table(table, seeds, text, layout.results_dir(workdir))
    if runs_of:
        nested_table = significance.nested_table(runs_of, cold_mask)
        nested = significance.nested_markdown(nested_table, runs_of)
        text += "\n" + nested
        if distributed.is_main_process():
            significance.write_nested(nested_table, runs_of, nested, layout.results_dir(workdir))
    return text


def _other_downstream_seeds(config, directory: str, names, count: int) -> list[dict]:
    """[{name: test ranks}] of the rows `names` under each of `count` more downstream seeds on the
    finished pipeline seed in `directory` (each resumes)."""
    with workdir_lib.lock(directory):
        data = readonly.load(config, directory)
        return [seeds_lib.downstream_ranks(names, config, directory, data, seed)
                for seed in seeds_lib.extra_downstream_seeds(config.seed, count)]
