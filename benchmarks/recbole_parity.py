"""Parity of our ID-only rows with RecBole 1.2.1's GRU4Rec, SR-GNN and SASRec on the same examples (issue 16).

    nice -n 10 python benchmarks/recbole_parity.py --data ../shared/data/cellphones_mmsbr --out OUT \
        --set data.min_item_count=1
    ... --max_sessions 3000 --epochs 1          # smoke: a thinned copy of the catalogue, one epoch a side

RecBole lives in its own virtual environment (`requirements-recbole.txt`; never the project's): this
file runs under the project's python as the driver and under `--recbole_python` as the RecBole worker
(`--worker SPEC.json`), so it imports only the standard library and numpy at the top.

Steps, one heavy process at a time:
  1. `launch/train.py --stage=prepare` prepares OUT/ours/data/prepared/ (validation carved from train by
     `data.valid_fraction` unless the catalogue's split.json lists one).
  2. RecBole atomic files from those splits, OUT/recbole/parity/parity.{train,valid,test}.inter: one
     train row per prefix of every train session (at most `max_session_length - 1` last clicks, what our
     rows train on), and exactly the (prefix, target) examples `data.examples("valid" / "test")` that
     our selection and evaluation rank.
  3. Per row: ours through `launch/train.py --stage=msbr --config.eval.models=<row>` (its per-row
     settings; DIR/msbr/<row>/selection.json gives the chosen epoch, DIR/results/results.csv the test
     metrics); RecBole in a subprocess with the same hidden size, dropout, learning rate, gradient clip
     and seed, full-softmax CE, early stopping on the validation file by MRR@20 (our row's patience,
     at most `--recbole_patience`; at most `--recbole_max_epochs`), the best validation epoch tested.
  4. One Markdown table (printed, OUT/parity.md) and OUT/parity.csv, rewritten after every row;
     `--report_only` writes it from the finished work in OUT without running anything.

Metrics agree by construction: the worker ranks the test targets from RecBole's own full-sort scores with
our rule (0-based rank = #{score >= target score} - 1 over all real items, so ties rank the target
last) and reports RecBole's evaluator (torch.topk, ties in arbitrary order) beside it, with the number of
test targets whose score ties another item's. Finished work is reused: ours by the project's own
resumption, RecBole's from OUT/recbole/<model>/result.json of the same spec.
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Our row -> RecBole model.
PEERS = {"gru4rec": "GRU4Rec", "srgnn": "SRGNN", "transformer": "SASRec"}
METRICS = (("HR", 10), ("HR", 20), ("MRR", 20), ("NDCG", 20))
DATASET = "parity"  # RecBole dataset name: OUT/recbole/parity/parity.<split>.inter
SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------------------------- metrics
def pessimistic_ranks(scores, targets):
    """0-based rank of each target with ties ranked below it (`tpad_jax.eval.metrics.ranks_from_scores`).

    Args:
      scores: float [b, N]; NaN counts as -inf. targets: int [b] columns.
    Returns:
      int64 [b] ranks.
    """
    scores = np.where(np.isnan(scores), -np.inf, scores)
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    return np.sum(scores >= target_scores, axis=1) - 1


def metrics_from_ranks(ranks) -> dict:
    """{"HR@10": %, ...} for METRICS, as `tpad_jax.eval.metrics.metrics_from_ranks` defines them."""
    ranks = np.asarray(ranks, np.float64)
    out = {}
    for metric, k in METRICS:
        hit = ranks < k
        value = {"HR": hit, "MRR": np.where(hit, 1.0 / (ranks + 1.0), 0.0),
                 "NDCG": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)}[metric]
        out[f"{metric}@{k}"] = 100.0 * float(np.mean(value))
    return out


# --------------------------------------------------------------------------------------- RecBole side
def recbole_settings(row: str, settings: dict, data: dict, max_epochs: int, patience: int) -> dict:
    """RecBole config of the peer of `row` given our row's resolved settings and data facts.

    Args:
      settings: our row's learning_rate, hidden_dim, dropout, seed, grad_clip, batch (prefixes per step).
      data: max_length (prefix width + 1).
      max_epochs, patience: RecBole's budget; patience counts epochs without a better MRR@20, as ours.
    """
    hidden, dropout = settings["hidden_dim"], settings["dropout"]
    model = {
        # Ours: GRU over the dropped-out item embeddings; RecBole adds a dense layer after the GRU.
        "gru4rec": {"embedding_size": hidden, "hidden_size": hidden, "num_layers": 1, "dropout_prob": dropout},
        # Ours: one gated-GNN step and SR-GNN's attention readout; RecBole's SR-GNN has no dropout.
        "srgnn": {"embedding_size": hidden, "step": 1},
        # Ours: 2 pre-LN blocks, 2 heads, MLP 4 x hidden, learned positions; RecBole's SASRec is post-LN.
        "transformer": {"hidden_size": hidden, "inner_size": 4 * hidden, "n_layers": 2, "n_heads": 2,
                        "hidden_dropout_prob": dropout, "attn_dropout_prob": dropout,
                        "hidden_act": "gelu"},
    }[row]
    return {
        **model,
        "USER_ID_FIELD": "session_id", "ITEM_ID_FIELD": "item_id",
        "load_col": {"inter": ["session_id", "item_id_list", "item_id"]},
        "benchmark_filename": list(SPLITS), "alias_of_item_id": ["item_id_list"],
        "MAX_ITEM_LIST_LENGTH": data["max_length"],
        "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"order": "TO", "mode": "full"},
        "metrics": ["Hit", "MRR", "NDCG"], "topk": [10, 20],
        "valid_metric": "MRR@20", "valid_metric_bigger": True,
        "epochs": max_epochs, "eval_step": 1,
        # RecBole stops once more than `stopping_step` epochs in a row fail to improve; ours after
        # `patience` of them.
        "stopping_step": patience - 1,
        "learning_rate": settings["learning_rate"], "weight_decay": 0.0,
        "clip_grad_norm": {"max_norm": settings["grad_clip"]} if settings["grad_clip"] else None,
        "train_batch_size": settings["batch"], "eval_batch_size": 1024,
        "seed": settings["seed"], "reproducibility": True,
        "use_gpu": False, "device": "cpu", "worker": 0, "show_progress": False,
    }


def run_worker(spec_path: str) -> None:
    """RecBole side (under --recbole_python): trains one peer, writes spec["result"]."""
    import torch  # noqa: PLC0415  (the worker's venv only)
    from recbole.config import Config  # noqa: PLC0415
    from recbole.data import create_dataset, data_preparation  # noqa: PLC0415
    from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: PLC0415

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    # Two intra-op threads on a 2-core machine shared with other jobs spin at every barrier: one
    # GRU4Rec step took 4.1 s there against 0.22 s with one thread.
    torch.set_num_threads(spec["threads"])
    clock = time.perf_counter()
    config = Config(model=spec["model"], dataset=DATASET,
                    config_dict={**spec["config"], "data_path": spec["data_path"],
                                 "checkpoint_dir": spec["checkpoint_dir"]})
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    # Every catalogue item occurs in some split, so RecBole's vocabulary is our catalogue plus padding.
    if dataset.item_num - 1 != spec["num_items"]:
        raise ValueError(f"RecBole sees {dataset.item_num - 1} items, the prepared catalogue has {spec['num_items']}")
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    history, epoch_times = [], []
    valid_epoch, train_epoch = trainer._valid_epoch, trainer._train_epoch

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        result = train_epoch(*args, **kwargs)
        epoch_times.append(time.perf_counter() - start)
        return result

    def recorded_valid(*args, **kwargs):
        score, result = valid_epoch(*args, **kwargs)
        history.append(float(score) * 100.0)
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train, recorded_valid
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    # RecBole's own reload calls torch.load with torch >= 2.6's weights_only default, which refuses its
    # checkpoint (it pickles the Config): the best epoch's weights are loaded here instead.
    checkpoint = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    best_epoch = checkpoint["epoch"] + 1
    own = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    # Our ranking rule over RecBole's full-sort scores of the best model (item 0 is padding).
    token_of = dataset.field2id_token["item_id"]
    ranks, ties, ours_targets = [], 0, []
    model.eval()
    with torch.no_grad():
        for interaction, _, _, positive_i in test_data:
            scores = model.full_sort_predict(interaction.to(config["device"])).view(len(positive_i), -1)
            scores[:, 0] = -np.inf
            scores, targets = scores.numpy().astype(np.float64), positive_i.numpy()
            ranks.append(pessimistic_ranks(scores, targets))
            target_scores = scores[np.arange(len(targets)), targets][:, None]
            ties += int(np.sum(np.sum(scores == target_scores, axis=1) > 1))
            ours_targets.extend(int(token_of[t]) for t in targets)
    ranks = np.concatenate(ranks)
    if sorted(ours_targets) != sorted(spec["test_targets"]):
        raise ValueError("RecBole's test targets differ from the prepared test examples")
    result = {
        "model": spec["model"], "pessimistic": metrics_from_ranks(ranks),
        "recbole_evaluator": {key.replace("hit", "HR").replace("mrr", "MRR").replace("ndcg", "NDCG"):
                              100.0 * float(value) for key, value in own.items()},
        "test_ties": ties, "test_examples": int(len(ranks)),
        "valid_mrr20_history": history, "best_epoch": best_epoch, "epochs_run": len(history),
        "epoch_train_s": epoch_times, "wall_s": time.perf_counter() - clock,
        "spec_config": spec["config"],
    }
    with open(spec["result"] + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(spec["result"] + ".tmp", spec["result"])


def write_atomic_files(data, directory: str, width: int) -> dict:
    """RecBole atomic files of the prepared splits; returns {split: number of rows}.

    `data`: a `tpad_jax.data.prepared.PreparedData`. Items are written as their prepared row numbers.
    """
    os.makedirs(directory, exist_ok=True)
    train = [(s[max(0, j - width):j], s[j]) for s in data.train for j in range(1, len(s))]
    examples = {"train": train, **{split: list(zip(*data.examples(split))) for split in ("valid", "test")}}
    counts = {}
    for split, pairs in examples.items():
        path = os.path.join(directory, f"{DATASET}.{split}.inter")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("session_id:token\titem_id_list:token_seq\titem_id:token\n")
            for i, (prefix, target) in enumerate(pairs):
                f.write(f"{split}{i}\t{' '.join(str(int(v)) for v in prefix)}\t{int(target)}\n")
        os.replace(path + ".tmp", path)
        counts[split] = len(pairs)
    return counts


# ------------------------------------------------------------------------------------------- our side
def run_project(args, script: str, workdir: str, raw_dir: str, extra) -> float:
    """Runs `python launch/<script> ...` of the project on `raw_dir`; returns its wall seconds."""
    command = [args.python, os.path.join(args.project, "launch", script), "--config", args.config,
               "--workdir", workdir, f"--config.data.raw_dir={raw_dir}",
               *(f"--config.{override}" for override in args.set), *extra]
    print("+ " + " ".join(command), flush=True)
    env = dict(os.environ, PYTHONPATH=args.project)  # the project tree named by --project, not an install
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=args.project, env=env)
    return time.perf_counter() - start


def row_settings(run_config: dict, row: str) -> dict:
    """Our row's resolved learning rate, hidden size, dropout, epoch budget (`msbr.per_model` over `msbr`)."""
    msbr = run_config["msbr"]
    own = (msbr.get("per_model") or {}).get(row) or {}
    keys = ("learning_rate", "hidden_dim", "dropout", "max_epochs", "patience")
    return {key: own[key] if own.get(key) is not None else msbr[key] for key in keys}


def read_text(path: str):
    """The text of `path`, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_results(path: str) -> dict:
    """{(model, metric@k): value} of the `all` slice of a results.csv."""
    with open(path, encoding="utf-8") as f:
        return {(r["model"], f"{r['metric']}@{r['k']}"): float(r["value"])
                for r in csv.DictReader(f) if r["slice"] == "all"}


def thinned_catalogue(raw_dir: str, out_dir: str, max_sessions: int) -> str:
    """A copy of `raw_dir` with every k-th session only (split.json restricted to them), for smoke runs."""
    with open(os.path.join(raw_dir, "sessions.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    step = max(1, math.ceil(len(lines) / max_sessions))
    kept = lines[::step]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sessions.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(kept)
    shutil.copyfile(os.path.join(raw_dir, "items.jsonl"), os.path.join(out_dir, "items.jsonl"))
    if os.path.isdir(os.path.join(raw_dir, "images")) and not os.path.exists(os.path.join(out_dir, "images")):
        os.symlink(os.path.join(raw_dir, "images"), os.path.join(out_dir, "images"))
    split_path = os.path.join(raw_dir, "split.json")
    if os.path.exists(split_path):
        ids = {json.loads(line)["session_id"] for line in kept}
        with open(split_path, encoding="utf-8") as f:
            split = json.load(f)
        with open(os.path.join(out_dir, "split.json"), "w", encoding="utf-8") as f:
            json.dump({name: [s for s in listed if s in ids] for name, listed in split.items()}, f)
    return out_dir


# ----------------------------------------------------------------------------------------------- table
def fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def parity_rows(out: str, cap: dict) -> list[dict]:
    """One dict per side of every row with finished work in `out`: metrics, epochs, wall seconds.

    Args:
      cap: {row: our epoch cap}.
    """
    ours_dir = os.path.join(out, "ours")
    results_path = os.path.join(ours_dir, "results", "results.csv")
    ours = read_results(results_path) if os.path.exists(results_path) else {}
    times = read_times(out)
    table = []
    for row, peer in PEERS.items():
        selection_path = os.path.join(ours_dir, "msbr", row, "selection.json")
        selection = None
        if os.path.exists(selection_path):
            with open(selection_path, encoding="utf-8") as f:
                selection = json.load(f)
        if selection and selection["finished"] and (row, "HR@20") in ours:
            table.append({"row": row, "implementation": "tpad_jax",
                          **{name: ours[(row, name)] for name in (f"{m}@{k}" for m, k in METRICS)},
                          "epoch": f"{selection['best_epoch']} / {len(selection['history'])} ({cap[row]})",
                          "wall_s": times.get(("ours", row)), "note": ""})
        result_path = os.path.join(out, "recbole", peer, "result.json")
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
            own = result["recbole_evaluator"]
            table.append({"row": row, "implementation": f"RecBole {peer}", **result["pessimistic"],
                          "epoch": f"{result['best_epoch']} / {result['epochs_run']} "
                                   f"({result['spec_config']['epochs']})",
                          "wall_s": result["wall_s"],
                          "note": f"RecBole's evaluator: HR@20 {own['HR@20']:.2f}, MRR@20 {own['MRR@20']:.2f}; "
                                  f"{result['test_ties']} tied test targets"})
    return table


def write_table(out: str, cap: dict) -> None:
    """Writes OUT/parity.md and OUT/parity.csv from the finished work in `out` and prints the table."""
    table = parity_rows(out, cap)
    if not table:
        return
    text = markdown(table)
    with open(os.path.join(out, "parity.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "parity.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(text + f"wrote {os.path.join(out, 'parity.md')} and parity.csv", flush=True)


def read_times(out: str) -> dict:
    """{(side, step): wall seconds} of OUT/times.json ({} before the first step)."""
    path = os.path.join(out, "times.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {tuple(key.split(":")): value for key, value in json.load(f).items()}


def markdown(rows: list[dict]) -> str:
    header = ["row", "implementation", *(f"{m}@{k}" for m, k in METRICS), "best epoch / run (cap)",
              "wall", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(METRICS) + "---|---:|---|"]
    for r in rows:
        wall = "–" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        lines.append("| " + " | ".join([r["row"], r["implementation"],
                                        *(fmt(r[f"{m}@{k}"]) for m, k in METRICS),
                                        r["epoch"], wall, r["note"]]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- driver
def main(args) -> None:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    args.project, args.config = os.path.abspath(args.project), os.path.abspath(args.config)
    raw_dir = os.path.abspath(args.data)
    if args.max_sessions:
        raw_dir = thinned_catalogue(raw_dir, os.path.join(out, "raw"), args.max_sessions)
    ours_dir = os.path.join(out, "ours")
    rows = args.rows.split(",")
    if args.report_only:
        with open(os.path.join(ours_dir, "config.json"), encoding="utf-8") as f:
            run_config = json.load(f)
        write_table(out, {row: args.epochs or row_settings(run_config, row)["max_epochs"] for row in PEERS})
        return
    times = read_times(out)

    def save_times():
        with open(os.path.join(out, "times.json"), "w", encoding="utf-8") as f:
            json.dump({":".join(key): value for key, value in times.items()}, f, indent=1)

    times[("ours", "prepare")] = run_project(args, "train.py", ours_dir, raw_dir, ["--stage=prepare"])
    from tpad_jax.data import prepared  # noqa: PLC0415  (the driver only; the worker has no tpad_jax)

    data = prepared.PreparedData(os.path.join(ours_dir, "data", "prepared"), raw_dir, ours_dir)
    with open(os.path.join(ours_dir, "config.json"), encoding="utf-8") as f:
        run_config = json.load(f)
    width = run_config["data"]["max_session_length"] - 1
    counts = write_atomic_files(data, os.path.join(out, "recbole", DATASET), width)
    print(f"RecBole atomic files: {counts} rows; {data.num_items} items; split {data.stats.get('split')}",
          flush=True)
    cap = {row: args.epochs or row_settings(run_config, row)["max_epochs"] for row in PEERS}

    for row in rows:
        settings = row_settings(run_config, row)
        epochs = ([f"--config.msbr.per_model.{row}.max_epochs={args.epochs}",
                   f"--config.msbr.per_model.{row}.patience={args.epochs}"] if args.epochs else [])
        selection_path = os.path.join(ours_dir, "msbr", row, "selection.json")
        before = read_text(selection_path)
        wall = run_project(args, "train.py", ours_dir, raw_dir,
                           ["--stage=msbr", f"--config.eval.models={row}", *epochs])
        # A finished row of the same inputs is only ranked again (its selection unchanged): keep the wall
        # time of its training. Other settings retrain it (a new selection): this run's time is its own.
        if read_text(selection_path) != before or ("ours", row) not in times:
            times[("ours", row)] = wall
            save_times()

        # Prefixes per step: ours batches whole sessions for causal encoders (gru4rec, transformer).
        prefixes_per_session = counts["train"] / max(len(data.train), 1)
        msbr = run_config["msbr"]
        batch = (round(msbr["sessions_per_batch"] * prefixes_per_session)
                 if row != "srgnn" and msbr["whole_sessions"] else msbr["batch_size"])
        config = recbole_settings(row, {**settings, "seed": run_config["seed"],
                                        "grad_clip": run_config["train"]["grad_clip"], "batch": batch},
                                  {"max_length": width + 1}, args.epochs or args.recbole_max_epochs,
                                  args.epochs or min(args.recbole_patience, settings["patience"]))
        peer = PEERS[row]
        work = os.path.join(out, "recbole", peer)
        os.makedirs(work, exist_ok=True)
        spec = {"model": peer, "config": config, "data_path": os.path.join(out, "recbole"),
                "checkpoint_dir": os.path.join(work, "saved"), "num_items": data.num_items,
                "threads": args.recbole_threads,
                "test_targets": [int(t) for t in data.examples("test")[1]],
                "result": os.path.join(work, "result.json")}
        spec_path = os.path.join(work, "spec.json")
        previous = None
        if os.path.exists(spec["result"]) and os.path.exists(spec_path):
            with open(spec_path, encoding="utf-8") as f:
                previous = json.load(f)
        if previous != spec:
            with open(spec_path, "w", encoding="utf-8") as f:
                json.dump(spec, f)
            command = [args.recbole_python, os.path.abspath(__file__), "--worker", spec_path]
            print("+ " + " ".join(command), flush=True)
            subprocess.run(command, check=True, cwd=work)
        write_table(out, cap)  # after every row, so an interrupted run still leaves its finished rows


def parse_args(argv):
    # argparse, not absl: the same file runs in RecBole's venv, which has neither absl nor ml_collections
    # as a promise.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help="the raw catalogue (canonical format)")
    parser.add_argument("--out", help="output directory (ours/, recbole/, parity.md, parity.csv)")
    parser.add_argument("--recbole_python", default=os.path.join(ROOT, ".venv-recbole", "bin", "python"),
                        help="python of a venv with requirements-recbole.txt installed")
    parser.add_argument("--python", default=sys.executable, help="the project's python")
    parser.add_argument("--project", default=ROOT, help="the project tree whose launch/*.py run")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tpad_base.py"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for our side, e.g. data.min_item_count=1 (repeatable)")
    parser.add_argument("--rows", default=",".join(PEERS), help="comma list of our rows")
    parser.add_argument("--recbole_max_epochs", type=int, default=20)
    parser.add_argument("--recbole_patience", type=int, default=3,
                        help="at most this patience for RecBole (our row's own when smaller)")
    parser.add_argument("--recbole_threads", type=int, default=1, help="torch intra-op threads of RecBole")
    parser.add_argument("--report_only", action="store_true",
                        help="only write the table from the finished work in --out (runs nothing)")
    parser.add_argument("--max_sessions", type=int, default=0, help="smoke: keep about N sessions")
    parser.add_argument("--epochs", type=int, default=0, help="smoke: this many epochs on both sides")
    args = parser.parse_args(argv)
    if not args.worker and not (args.data and args.out):
        parser.error("--data and --out are required")
    if any(row not in PEERS for row in args.rows.split(",")):
        parser.error(f"--rows: choose from {','.join(PEERS)}")
    return args


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.worker:
        run_worker(arguments.worker)
    else:
        main(arguments)
