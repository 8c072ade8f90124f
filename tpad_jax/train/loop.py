"""The one training loop of every stage: a pure step jitted once, logging, eval, checkpoints, resume."""

import collections
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import optax
import tqdm
from flax import nnx

from tpad_jax import workdir as workdir_lib
from tpad_jax.parallel import distributed
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import checkpointing
from tpad_jax.train.metrics_log import MetricsWriter

# loss_fn(model, batch, rng) -> (scalar loss, {name: scalar}); may update non-trainable model state.
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
# eval_fn(model, step) -> {name: float}; logged as "eval/<name>".
EvalFn = Callable[[Any, int], Mapping[str, float]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the offending state was not saved."""


class TrainState(nnx.Module):
    """The model and its optimizer (over the `wrt` parameters): what a step updates and a checkpoint holds."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, wrt):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)


@dataclasses.dataclass
class LoopResult:
    """What `run_loop` ends with."""

    state: TrainState  # state.model is the trained model
    step: int
    metrics: dict[str, float]  # the last logged metrics ({} when no step ran)
    train_step_compiles: int  # compilations of the train step in this call (1 when any step ran)


# The event jax records around every XLA compilation (or persistent-cache load), with the module name.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Lowering to StableHLO and XLA's compile: what a first call spends before it runs. Tracing is left out:
# its event fires again for every nested jit inside the traced function, so summing it counts twice.
COMPILE_SECONDS_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", BACKEND_COMPILE_EVENT)


class CompileCounter:
    """Counts XLA compilations per jitted function name while entered (a context manager).

    Why jax.monitoring and not the jitted function's `_cache_size()`: the cache size counts dispatch
    signatures, not compilations (a numpy argument adds an entry that reuses the compiled executable),
    and it is a private API; the compile event is public and fires once per real compilation, whichever
    thread compiles. It names the module (`jit(<function name>)`), so the counted function needs a name
    of its own: the loop's step is `train_step`.
    """

    def __init__(self):
        self.counts = collections.Counter()
        self.seconds = 0.0  # lowering + XLA compile seconds of every function while entered

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.counts[kwargs.get("fun_name", "")] += 1
        if event in COMPILE_SECONDS_EVENTS:
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc_info):
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def of(self, jitted) -> int:
        """Compilations of `jitted` (a `jax.jit` function) so far."""
        return self.counts[f"jit({jitted.__name__})"]

    def total(self) -> int:
        """Compilations of any function so far."""
        return sum(self.counts.values())


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, wrt):
    """The pure step `(state, batch, rng_data) -> (state, metrics)` of a TrainState's graphdef + state.

    The step's RNG is `fold_in(rng, optimizer step)`, so a resumed run draws the same keys.
    """

    def train_step(state, batch, rng_data):
        train_state = nnx.merge(graphdef, state)
        rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), train_state.optimizer.step[...])
        model_def, params, rest = nnx.split(train_state.model, wrt, ...)

        def loss_of(params):
            model = nnx.merge(model_def, params, rest)
            loss, aux = loss_fn(model, batch, rng)
            # The non-trainable state may change (RNG counters, running statistics): carry it out.
            return loss, (aux, nnx.state(model, nnx.Not(wrt)))

        (loss, (aux, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        nnx.update(train_state.model, new_rest)
        train_state.optimizer.update(train_state.model, grads)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return nnx.state(train_state), metrics

    return train_step


def jit_train_step(step, abstract: nnx.State, mesh: jax.sharding.Mesh):
    """Compiles `step` once: state on the shardings of `abstract` (donated), batch over the data axes."""
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    replicated = mesh_lib.replicated(mesh)
    return jax.jit(step, in_shardings=(state_shardings, mesh_lib.data_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def checkpointed(state: nnx.State, wrt, constants=nnx.Nothing) -> nnx.State:
    """The part of a TrainState's `state` (or abstract state) that a checkpoint holds: all but what
    `make_model` and `init_fn` rebuild exactly and no step changes, i.e. the frozen parameters (not in
    `wrt`) and the variables of the `constants` filter (per-item tables).

    Why: a checkpoint of the whole state repeats the frozen base (GBs for a pretrained one) and every
    per-item table (about 128 KiB an item at the 7B shape) at every save, and ties a resume to the
    table's row padding, i.e. to the mesh. `wrt` selects by paths inside the model, so it is applied
    to the model's part alone.
    """
    model = nnx.filter_state(state["model"], nnx.Not(nnx.Any(nnx.All(nnx.Param, nnx.Not(wrt)), constants)))
    return nnx.State({"model": model, "optimizer": state["optimizer"]})


def checkpoint_target(abstract: nnx.State, mesh: jax.sharding.Mesh) -> dict:
    """The restore target of a loop checkpoint: the (checkpointed) abstract TrainState and the base RNG."""
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {"train": abstract,
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=mesh_lib.replicated(mesh))}


def restore_state(manager, step: int, *, abstract: nnx.State, mesh: jax.sharding.Mesh, wrt, constants,
                  rebuild: Callable[[], nnx.State], data_iterator=None) -> tuple[nnx.State, jax.Array]:
    """(TrainState state, base RNG key data) of checkpoint `step`: the saved variables over the state
    `rebuild()` makes afresh (`fresh_state`), which supplies what `checkpointed` leaves out.

    A checkpoint written before checkpoints left that out holds every variable, and is restored whole.
    """
    saved = checkpointed(abstract, wrt, constants)
    if checkpointing.leaf_count(manager, step, "train") > len(jax.tree.leaves(saved)):
        restored = checkpointing.restore(manager, step, checkpoint_target(abstract, mesh), data_iterator)
        return restored["train"], restored["rng"]
    restored = checkpointing.restore(manager, step, checkpoint_target(saved, mesh), data_iterator)
    return nnx.merge_state(rebuild(), restored["train"]), restored["rng"]


def build_step(*, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules, make_model: Callable[[], nnx.Module],
                  tx: optax.GradientTransformation, wrt, loss_fn: LossFn):
    """(graphdef, abstract state, jitted train step) of a TrainState over `make_model()`."""
    graphdef, abstract = mesh_lib.abstract_state(lambda: TrainState(make_model(), tx, wrt), mesh, rules)
    with mesh_lib.activate(mesh, rules):
        train_step = jit_train_step(make_train_step(graphdef, loss_fn, wrt), abstract, mesh)
    return graphdef, abstract, train_step


def fresh_state(*, abstract: nnx.State, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules,
                make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, wrt,
                init_fn: Callable[[nnx.Module], None] | None, seed: int) -> tuple[nnx.State, jax.Array]:
    """(TrainState state on the shardings of `abstract`, base RNG key data) of a run's first step."""
    train_state = mesh_lib.sharded_init(lambda: TrainState(make_model(), tx, wrt), mesh, rules)
    if init_fn is not None:
        with mesh_lib.activate(mesh, rules):
            init_fn(train_state.model)
        # What init_fn wrote may live on one device: put it back on the planned shardings.
        state = jax.device_put(nnx.state(train_state), jax.tree.map(lambda x: x.sharding, abstract))
    else:
        state = nnx.state(train_state)
    rng_data = jax.device_put(jax.random.key_data(jax.random.key(seed)), mesh_lib.replicated(mesh))
    return state, rng_data


# With `select_on`, the run keeps its best evaluated state here (one checkpoint) and names its step in
# SELECTED_FILE; the latest checkpoints stay in checkpoints/ for resuming.
BEST_DIR = "checkpoints_best"
SELECTED_FILE = "selected.json"


def final_step(workdir: str | pathlib.Path) -> int | None:
    """The step of the state `run_loop` ended with in `workdir`: its selected step (`select_on`), else its
    latest checkpoint; None before any checkpoint."""
    selected = pathlib.Path(workdir) / SELECTED_FILE
    if selected.is_file():
        return json.loads(selected.read_text())["step"]
    directory = pathlib.Path(workdir) / "checkpoints"
    steps = [int(entry.name) for entry in directory.iterdir() if entry.name.isdigit()] if directory.is_dir() else []
    return max(steps) if steps else None


def load_train_state(*, workdir: str | pathlib.Path, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules,
                     make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, wrt,
                     init_fn: Callable[[nnx.Module], None] | None = None, constants=nnx.Nothing,
                     step: int | None = None) -> TrainState:
    """The TrainState saved by `run_loop` in `workdir`: the one it ended with (`final_step`) unless `step`
    is given.

    `init_fn` and `constants` as the run gave them: `init_fn` rebuilds what the checkpoint left out (it
    may leave the `constants` unset when the caller does not read them).
    """
    model_args = dict(mesh=mesh, rules=rules, make_model=make_model, tx=tx, wrt=wrt)
    graphdef, abstract = mesh_lib.abstract_state(lambda: TrainState(make_model(), tx, wrt), mesh, rules)
    step = final_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
    manager = checkpointing.make_manager(pathlib.Path(workdir) / "checkpoints", max_to_keep=1)
    if step not in manager.all_steps() and (pathlib.Path(workdir) / BEST_DIR).is_dir():
        manager.close()  # the step is the selected one (`select_on`), kept apart from the latest
        manager = checkpointing.make_manager(pathlib.Path(workdir) / BEST_DIR, max_to_keep=1)
    try:
        state, _ = restore_state(
            manager, step, abstract=abstract, mesh=mesh, wrt=wrt, constants=constants,
            rebuild=lambda: fresh_state(abstract=abstract, init_fn=init_fn, seed=0, **model_args)[0])
    finally:
        manager.close()
    return nnx.merge(graphdef, state)


def _host_metrics(step: int, metrics, last_checkpoint: int | None) -> dict[str, float]:
    """Fetches the step's metrics; raises NonFiniteLossError on a NaN or infinite loss."""
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: metrics {values}; stopped without saving this state "
            f"(last checkpoint: step {last_checkpoint})")
    return values


def _leading_dim(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def run_loop(*, workdir: str | pathlib.Path, train_config, mesh: jax.sharding.Mesh,
             rules: mesh_lib.Rules, make_model: Callable[[], nnx.Module],
             tx: optax.GradientTransformation, wrt, loss_fn: LossFn, data_iterator: Iterator,
             num_steps: int, seed: int, eval_fn: EvalFn | None = None, desc: str = "train",
             init_fn: Callable[[nnx.Module], None] | None = None, constants=nnx.Nothing,
             select_on: str | None = None) -> LoopResult:
    """Trains `make_model()` for `num_steps` steps, resuming from the latest checkpoint in `workdir`.

    Args:
      workdir: the stage directory: checkpoints/, metrics.jsonl and tb/ go there.
      train_config: `config.train` (log_every, eval_every, checkpoint_every, max_to_keep).
      mesh: the device mesh; rules: logical axis rules for the model's variables.
      make_model: builds the model from scratch, deterministically (the restore target uses it too).
      tx: the optimizer (`optim.make_optimizer`); wrt: the trainable filter (`optim.trainable_filter`).
      loss_fn: `loss_fn(model, batch, rng) -> (loss, aux_metrics)`, traced once.
      data_iterator: a grain DatasetIterator of this process's numpy batches; its position is saved.
      num_steps: the total number of steps of the stage (not the number left).
      seed: seeds the step RNG of a fresh run (a resumed run restores it).
      eval_fn: called every `train_config.eval_every` steps.
      desc: the progress-bar label.
      init_fn: called on a fresh model before training, to set state that is not a random init: an
        earlier stage's weights, a pretrained base, per-item constant tables. A resume calls it too,
        for what the checkpoint leaves out (`checkpointed`), so it must give the same values each time.
      constants: nnx filter of the non-parameter variables that `init_fn` sets and no step changes;
        checkpoints leave them out, with the frozen parameters.
      select_on: a key of `eval_fn`'s results: the run then also evaluates its starting state (step 0)
        and ends with, and returns, the evaluated state where that value was highest (early stopping
        on validation, the starting state included), kept in BEST_DIR with its step in SELECTED_FILE.
        None ends with the last step's state.
    """
    workdir = pathlib.Path(workdir)
    if select_on is not None and eval_fn is None:
        raise ValueError("select_on needs an eval_fn to select by")
    is_main = distributed.is_main_process()

    # ------------------------------------------------------------------------------------ step
    model_args = dict(mesh=mesh, rules=rules, make_model=make_model, tx=tx, wrt=wrt)
    graphdef, abstract, train_step = build_step(loss_fn=loss_fn, **model_args)

    # ------------------------------------------------------------------------------ checkpoint
    manager = checkpointing.make_manager(workdir / "checkpoints", train_config.max_to_keep)
    selector = None if select_on is None else checkpointing.make_manager(workdir / BEST_DIR, 1, select_on)
    start = manager.latest_step()
    if start is None:
        start = 0
        state, rng_data = fresh_state(abstract=abstract, init_fn=init_fn, seed=seed, **model_args)
    else:
        state, rng_data = restore_state(
            manager, start, abstract=abstract, mesh=mesh, wrt=wrt, constants=constants,
            rebuild=lambda: fresh_state(abstract=abstract, init_fn=init_fn, seed=seed, **model_args)[0],
            data_iterator=data_iterator)
        if is_main:
            tqdm.tqdm.write(f"resuming {desc} from checkpoint step {start}")

    # ------------------------------------------------------------------------------------ loop
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
    progress = tqdm.tqdm(total=num_steps, initial=start, desc=desc, disable=not is_main)
    last_checkpoint = None if start == 0 else start
    logged: dict[str, float] = {}
    previous = None  # (step, metrics) still to check: checked while the next step runs
    examples, clock = 0, time.perf_counter()
    compiles = CompileCounter()
    eval_compiles = []  # compilations during each eval call

    def saved(state) -> dict:  # what a checkpoint of `state` holds
        return {"train": checkpointed(state, wrt, constants), "rng": rng_data}

    def evaluate(step: int, state) -> None:
        before = compiles.total()
        with mesh_lib.activate(mesh, rules):
            results = eval_fn(nnx.merge(graphdef, state).model, step)
        eval_compiles.append(compiles.total() - before)
        writer.write(step, {**{f"eval/{name}": value for name, value in results.items()},
                            "eval/compiles": eval_compiles[-1]})
        # A step redone after a resume is kept already when it is the best so far.
        if selector is not None and step not in selector.all_steps():
            checkpointing.save(selector, step, saved(state), metrics={select_on: float(results[select_on])})

    try:
        with compiles:
            if selector is not None and start == 0:
                evaluate(0, state)
            for step in range(start + 1, num_steps + 1):
                try:
                    local_batch = next(data_iterator)
                except StopIteration:
                    raise ValueError(
                        f"{desc}: the data iterator ended before step {step} of {num_steps}") from None
                batch = mesh_lib.global_batch(local_batch, mesh)
                with mesh_lib.activate(mesh, rules):
                    state, metrics = train_step(state, batch, rng_data)
                if previous is not None:
                    _host_metrics(*previous, last_checkpoint)
                previous = (step, metrics)
                examples += _leading_dim(batch)
                progress.update(1)

                if step % train_config.log_every == 0 or step == num_steps:
                    logged = _host_metrics(step, metrics, last_checkpoint)
                    elapsed = time.perf_counter() - clock
                    logged["examples_per_s"] = examples / elapsed
                    # Cumulative: a record where it grows past 1 dates a recompilation.
                    logged["train_step_compiles"] = compiles.of(train_step)
                    examples, clock = 0, time.perf_counter()
                    writer.write(step, logged)
                    progress.set_postfix(loss=f"{logged['loss']:.4f}",
                                         ex_s=f"{logged['examples_per_s']:.1f}")

                if eval_fn is not None and step % train_config.eval_every == 0:
                    evaluate(step, state)

                if step % train_config.checkpoint_every == 0 or step == num_steps:
                    _host_metrics(step, metrics, last_checkpoint)
                    checkpointing.save(manager, step, saved(state), data_iterator)
                    last_checkpoint = step
        last = max(start, num_steps)
        if selector is not None:
            selector.wait_until_finished()
            selected = selector.best_step()
            if selected != last:
                # Over the live state, which holds what no step changes (a rebuild could read buffers
                # that init_fn shares with a state the steps have donated since).
                target = checkpoint_target(checkpointed(abstract, wrt, constants), mesh)
                state = nnx.merge_state(state, checkpointing.restore(selector, selected, target)["train"])
            value = selector.metrics(selected)[select_on]
            if is_main:
                with workdir_lib.atomic_open(workdir / SELECTED_FILE) as f:
                    json.dump({"step": selected, "last_step": last, "metric": select_on, "value": value}, f)
                tqdm.tqdm.write(f"{desc}: ends with step {selected} of {last}, its best {select_on} on "
                                f"validation ({value:.4g})")
    finally:
        # Lets an in-flight save of the last good state complete, even when a step failed.
        for open_manager in (manager, selector):
            if open_manager is not None:
                open_manager.wait_until_finished()
                open_manager.close()
        progress.close()
        writer.close()
    if is_main and start < num_steps:
        tqdm.tqdm.write(_compile_summary(desc, compiles.of(train_step), eval_compiles))
    return LoopResult(state=nnx.merge(graphdef, state), step=last, metrics=logged,
                      train_step_compiles=compiles.of(train_step))


def _compile_summary(desc: str, step_compiles: int, eval_compiles: list[int]) -> str:
    """E.g. "stage 2 (tpad): 1 compile of the train step; evals compiled 9, 0, 0 functions"."""
    line = f"{desc}: {step_compiles} compile{'s' * (step_compiles != 1)} of the train step"
    if eval_compiles:
        line += f"; evals compiled {', '.join(map(str, eval_compiles))} functions"
    return line
