"""The training loop: resume after SIGKILL, the non-finite guard, mesh equivalence, optimizer groups."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import resume_worker
import toy_training as toy
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import checkpointing, loop, optim
from tpad_jax.train.metrics_log import read_metrics

WORKER = pathlib.Path(__file__).with_name("resume_worker.py")
STEPS = 12


def _committed_steps(checkpoint_dir: pathlib.Path) -> list[int]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def _worker(workdir, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(workdir), str(STEPS), "0.01", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    evals = []
    reference = resume_worker.run(tmp_path / "reference", STEPS, delay_s=0.0,
                                  eval_fn=lambda model, step: evals.append(step) or {"step_seen": step})
    expected = toy.trained_params(reference)

    killed = _worker(tmp_path / "resumed", tmp_path / "unused.npz")
    try:
        deadline = time.monotonic() + 120
        while not any(s >= 6 for s in _committed_steps(tmp_path / "resumed" / "checkpoints")):
            assert killed.poll() is None, killed.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint 6 within 120 s"
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL  # killed mid-run, not finished
    finally:
        if killed.poll() is None:
            killed.kill()
    resumed_from = max(_committed_steps(tmp_path / "resumed" / "checkpoints"))
    assert resumed_from < STEPS

    restarted = _worker(tmp_path / "resumed", tmp_path / "resumed.npz")
    try:
        output = restarted.communicate(timeout=180)[0].decode()
    finally:
        if restarted.poll() is None:
            restarted.kill()
    assert restarted.returncode == 0, output[-3000:]
    assert f"resuming train from checkpoint step {resumed_from}" in output
    # The killed attempt's records of the steps redone after its checkpoint are gone: no step twice.
    resumed_steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert resumed_steps == list(range(1, STEPS + 1))

    got = np.load(tmp_path / "resumed.npz")
    assert set(got.files) == set(expected)
    max_diff = max(float(np.max(np.abs(got[name] - expected[name]))) for name in expected)
    print(f"resume from step {resumed_from}: max abs param diff vs uninterrupted run = {max_diff:.3g}")
    assert max_diff < 1e-7

    # The uninterrupted run's logs: one metrics record per step, eval records, TensorBoard events.
    records = read_metrics(tmp_path / "reference")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert {"time", "loss", "mae", "grad_norm", "examples_per_s"} <= set(train_records[0])
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert evals == [4, 8, 12]
    assert [r["eval/step_seen"] for r in records if "eval/step_seen" in r] == [4.0, 8.0, 12.0]
    assert list((tmp_path / "reference" / "tb").glob("events.out.tfevents.*"))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    mesh = mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1)))
    models = dict(mesh=mesh, rules=toy.RULES, make_model=toy.make_model, tx=toy.make_tx(), wrt=toy.TRAINABLE)
    # Batch 5 is poisoned; log_every=4 makes the guard catch it one step late (while step 6 runs),
    # before the checkpoint of step 6 is written.
    frozen_kernel = np.full((toy.IN_DIM, toy.HIDDEN_DIM), 0.5, np.float32)

    def set_frozen_kernel_from_host(model):  # init_fn: an unsharded host value for a sharded weight
        model.body.kernel[...] = frozen_kernel

    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 5: .*'loss': (nan|inf)"):
        loop.run_loop(workdir=tmp_path, train_config=toy.train_config(log_every=4, checkpoint_every=2),
                      loss_fn=toy.loss_fn, data_iterator=iter(toy.dataset(8, poison_from=4)),
                      num_steps=10, seed=0, init_fn=set_frozen_kernel_from_host, **models)
    manager = checkpointing.make_manager(tmp_path / "checkpoints", max_to_keep=2)
    assert manager.all_steps() == [2, 4]
    state = loop.load_train_state(workdir=tmp_path, init_fn=set_frozen_kernel_from_host, **models)
    assert int(state.optimizer.step[...]) == 4
    np.testing.assert_array_equal(np.asarray(state.model.body.kernel[...]), frozen_kernel)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(nnx.state(state.model)))
    assert [r["step"] for r in read_metrics(tmp_path)] == [4]


def test_checkpoints_hold_what_training_changes_and_a_restore_rebuilds_the_rest(tmp_path):
    mesh = mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1)))
    models = dict(mesh=mesh, rules=toy.RULES, make_model=toy.make_model, tx=toy.make_tx(), wrt=toy.TRAINABLE)
    frozen_kernel = np.full((toy.IN_DIM, toy.HIDDEN_DIM), 0.5, np.float32)

    def init_fn(model):  # a "pretrained" frozen weight: what make_model alone does not give
        model.body.kernel[...] = frozen_kernel

    result = loop.run_loop(workdir=tmp_path / "run", train_config=toy.train_config(checkpoint_every=2),
                           loss_fn=toy.loss_fn, data_iterator=iter(toy.dataset(8)), num_steps=4, seed=0,
                           init_fn=init_fn, **models)
    trained = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(result.state)))
    manager = checkpointing.make_manager(tmp_path / "run" / "checkpoints", max_to_keep=2)
    saved = manager.item_metadata(4)["state"].tree["train"]
    manager.close()
    # The frozen kernel and bias are left out; the LoRA factors, the trained head and Adam's state stay.
    assert set(saved["model"]["body"]) == {"lora"} and set(saved["model"]["head"]) == {"kernel", "bias"}
    assert "opt_state" in saved["optimizer"]

    restored = loop.load_train_state(workdir=tmp_path / "run", init_fn=init_fn, **models)
    jax.tree.map(np.testing.assert_array_equal, trained,
                 jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(restored))))

    # A checkpoint of the whole state (as written before this layout) still restores, whole.
    manager = checkpointing.make_manager(tmp_path / "whole" / "checkpoints", max_to_keep=1)
    rng = jax.random.key_data(jax.random.key(0))
    checkpointing.save(manager, 4, {"train": nnx.state(result.state), "rng": rng})
    manager.wait_until_finished()
    manager.close()
    whole = loop.load_train_state(workdir=tmp_path / "whole", **models)  # no init_fn: the kernel is read back
    jax.tree.map(np.testing.assert_array_equal, trained,
                 jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(whole))))


def _select_run(workdir, num_steps, script, select_on="score", **overrides):
    """The toy loop over 8 steps' schedule for `num_steps` steps; eval_fn reads `script[step]`."""
    mesh = mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1)))
    config = toy.train_config(**{"eval_every": 2, "checkpoint_every": 2, **overrides})
    return loop.run_loop(workdir=workdir, train_config=config, mesh=mesh, rules=toy.RULES,
                         make_model=toy.make_model, tx=toy.make_tx(8), wrt=toy.TRAINABLE, loss_fn=toy.loss_fn,
                         data_iterator=iter(toy.dataset(8)), num_steps=num_steps, seed=0,
                         eval_fn=lambda model, step: {"score": script[step]}, select_on=select_on)


def _assert_same_params(got: dict, expected: dict):
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("script, best", [({0: 1.0, 2: 3.0, 4: 7.0, 6: 2.0, 8: 5.0}, 4),
                                          ({0: 9.0, 2: 3.0, 4: 7.0, 6: 2.0, 8: 5.0}, 0)])
def test_select_on_ends_with_the_best_evaluated_state_the_starting_one_included(tmp_path, script, best):
    # The reference: a plain run stopped at the best step, on the same 8-step schedule and data.
    expected = toy.trained_params(_select_run(tmp_path / "reference", best, script, select_on=None))
    result = _select_run(tmp_path / "run", 8, script)
    assert result.step == 8
    _assert_same_params(toy.trained_params(result), expected)
    assert json.loads((tmp_path / "run" / loop.SELECTED_FILE).read_text()) == {
        "step": best, "last_step": 8, "metric": "score", "value": script[best]}
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "eval/score" in r] == [0, 2, 4, 6, 8]
    # What reads the stage later (exports, new items) gets the selected state too, and so does a rerun.
    assert loop.final_step(tmp_path / "run") == best
    models = dict(mesh=mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1))), rules=toy.RULES,
                  make_model=toy.make_model, tx=toy.make_tx(8), wrt=toy.TRAINABLE)
    loaded = loop.load_train_state(workdir=tmp_path / "run", **models)
    _assert_same_params(toy.trained_params(loop.LoopResult(loaded, best, {}, 0)), expected)
    _assert_same_params(toy.trained_params(_select_run(tmp_path / "run", 8, script)), expected)


def test_select_on_survives_a_resume(tmp_path):
    script = {0: 1.0, 2: 6.0, 4: 3.0, 6: 2.0, 8: 5.0}  # the best state is in the first part
    expected = toy.trained_params(_select_run(tmp_path / "reference", 2, script, select_on=None))
    _select_run(tmp_path / "run", 4, script)  # stops at step 4, as an interrupted run does
    result = _select_run(tmp_path / "run", 8, script)
    _assert_same_params(toy.trained_params(result), expected)
    assert json.loads((tmp_path / "run" / loop.SELECTED_FILE).read_text())["step"] == 2


def _batches_of_sizes(sizes):
    """A checkpointable iterator of toy batches of the given sizes, in order."""
    return grain.MapDataset.source(list(sizes)).map(
        lambda size: toy.split_row(toy.examples(size))).to_iter_dataset()


@pytest.mark.parametrize("sizes, expected", [((8,) * 6, [1] * 6), ((8,) * 3 + (16,) * 3, [1, 1, 1, 2, 2, 2])])
def test_train_step_compiles_once_per_batch_shape(tmp_path, sizes, expected):
    """One compile over a stage of fixed shapes; the counter does see a second one (cumulative per
    logged step) when the batch shape changes."""
    mesh = mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1)))
    evals = lambda model, step: {"step_seen": step}  # noqa: E731
    result = loop.run_loop(workdir=tmp_path, train_config=toy.train_config(eval_every=2), mesh=mesh,
                           rules=toy.RULES, make_model=toy.make_model, tx=toy.make_tx(), wrt=toy.TRAINABLE,
                           loss_fn=toy.loss_fn, data_iterator=iter(_batches_of_sizes(sizes)),
                           num_steps=len(sizes), seed=0, eval_fn=evals)
    assert result.train_step_compiles == expected[-1]
    records = read_metrics(tmp_path)
    assert [r["train_step_compiles"] for r in records if "loss" in r] == expected
    assert [r["eval/compiles"] for r in records if "eval/compiles" in r] == [0, 0, 0]


def test_compile_counter_times_first_calls_and_not_cached_ones():
    """Its seconds grow by the first call's lowering + compile, bounded by that call's wall time, and
    not at all on a second call of the same shapes (the cache answers)."""
    matmul = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
    x = jnp.ones((64, 64))
    with loop.CompileCounter() as first:
        start = time.perf_counter()
        jax.block_until_ready(matmul(x))
        wall = time.perf_counter() - start
    with loop.CompileCounter() as again:
        jax.block_until_ready(matmul(x))
    assert 0 < first.seconds <= wall and first.total() == 1
    assert again.seconds == 0 and again.total() == 0


def _one_step(mesh):
    """Loss and updated parameters after one jitted step on `mesh` from the same init and batch."""
    make = lambda: loop.TrainState(toy.make_model(), toy.make_tx(), toy.TRAINABLE)  # noqa: E731
    graphdef, abstract = mesh_lib.abstract_state(make, mesh, toy.RULES)
    state = nnx.state(mesh_lib.sharded_init(make, mesh, toy.RULES))
    with mesh_lib.activate(mesh, toy.RULES):
        step = loop.jit_train_step(loop.make_train_step(graphdef, toy.loss_fn, toy.TRAINABLE), abstract, mesh)
        batch = mesh_lib.global_batch(toy.split_row(toy.examples(16)), mesh)
        rng = jax.device_put(jax.random.key_data(jax.random.key(0)), mesh_lib.replicated(mesh))
        state, metrics = step(state, batch, rng)
    kernel = state["model"]["body"]["kernel"][...]
    assert kernel.sharding.spec == P("fsdp", "tensor") and len(kernel.sharding.device_set) == mesh.size
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state).model)))
    return float(metrics["loss"]), params


@pytest.fixture(scope="module")
def unsharded_step():
    return _one_step(toy.single_device_mesh())


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_step_matches_unsharded_step(shape, unsharded_step):
    loss_ref, params_ref = unsharded_step
    loss, params = _one_step(mesh_lib.make_mesh(toy.mesh_config(shape)))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, params_ref)
    param_diff = max(jax.tree.leaves(diffs))
    print(f"mesh {shape}: |loss diff| = {abs(loss - loss_ref):.3g}, max |param diff| = {param_diff:.3g}")
    assert abs(loss - loss_ref) < 1e-6
    assert param_diff < 1e-6


def test_warmup_cosine_closed_form():
    schedule = optim.warmup_cosine(peak_lr=0.5, warmup_steps=4, total_steps=12)
    np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 8, 12)], [0.0, 0.25, 0.5, 0.25, 0.0],
                               atol=1e-7)


@pytest.fixture
def on_one_device():
    """Flax's eager sharding needs a mesh to create variables that name logical axes."""
    with mesh_lib.activate(toy.single_device_mesh(), toy.RULES):
        yield


def test_groups_follow_their_own_schedules_and_frozen_params_stay(on_one_device):
    groups = {"heads": optim.GroupSchedule("head", peak_lr=0.3, warmup_steps=1, total_steps=5),
              "lora": optim.GroupSchedule("lora", peak_lr=0.1, warmup_steps=1, total_steps=5)}
    model = toy.make_model()
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    optimizer = nnx.Optimizer(model, optim.make_optimizer(groups, grad_clip=1.0), wrt=toy.TRAINABLE)
    # Constant gradients: Adam's bias-corrected step is lr * sign(g) from the second update on, and the
    # global-norm clipping scales every gradient alike, which Adam ignores. rtol 1e-4: Adam's float32
    # bias correction 1 - 0.999**2 loses digits to cancellation.
    ones = jax.tree.map(jnp.ones_like, nnx.state(model, toy.TRAINABLE))
    update = nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))
    for _ in range(2):
        update(optimizer, model, ones)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    lr_at_1 = {name: float(optim.warmup_cosine(g.peak_lr, 1, 5)(1)) for name, g in groups.items()}
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(before["head"][name] - after["head"][name], lr_at_1["heads"], rtol=1e-4)
    for factor in ("lora_a", "lora_b"):
        np.testing.assert_allclose(before["body"]["lora"][factor] - after["body"]["lora"][factor],
                                   lr_at_1["lora"], rtol=1e-4)
    np.testing.assert_array_equal(before["body"]["kernel"], after["body"]["kernel"])
    np.testing.assert_array_equal(before["body"]["bias"], after["body"]["bias"])


def test_trainable_parameter_outside_every_group_is_named(on_one_device):
    groups = {"heads": optim.GroupSchedule("head", peak_lr=0.1, warmup_steps=1, total_steps=5)}
    with pytest.raises(ValueError, match="body/lora/lora_a"):
        nnx.Optimizer(toy.make_model(), optim.make_optimizer(groups), wrt=toy.TRAINABLE)
