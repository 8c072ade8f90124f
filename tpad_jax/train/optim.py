"""Optimizers: per-group learning-rate schedules chosen by parameter path, and the trainable filter."""

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import optax
from flax import nnx

from tpad_jax.models import tpad as tpad_lib


DECAYS = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class GroupSchedule:
    """Learning-rate schedule for the trainable parameters whose path matches `pattern`: linear warmup,
    then a cosine decay to 0 at `total_steps` (`decay="cosine"`) or the peak rate held (`"constant"`)."""

    pattern: str  # regex, searched in the "/"-joined path, e.g. "knowledge/.*lora"
    peak_lr: float
    warmup_steps: int
    total_steps: int
    decay: str = "cosine"  # cosine | constant

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"learning-rate decay must be one of {DECAYS}, got {self.decay!r}")

    def schedule(self) -> optax.Schedule:
        if self.decay == "constant":
            if not self.warmup_steps:
                return optax.constant_schedule(self.peak_lr)
            return optax.linear_schedule(0.0, self.peak_lr, self.warmup_steps)  # holds the peak after it
        return warmup_cosine(self.peak_lr, self.warmup_steps, self.total_steps)


def path_string(path: Sequence) -> str:
    """"/"-joined parameter path from nnx state keys or jax key paths."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def path_matches(pattern: str):
    """nnx filter: variables whose "/"-joined path contains a match of the regex `pattern`."""
    compiled = re.compile(pattern)
    return lambda path, value: compiled.search(path_string(path)) is not None


def trainable_filter(group_names: Sequence[str], *, full_finetune: bool, train_projector: bool):
    """nnx filter of the TPAD parameters an optimizer updates (its `wrt`).

    Args:
      group_names: the `tpad.GROUP_PATTERNS` groups being trained (e.g. ["knowledge"] in stage 1).
      full_finetune: also train the bases (`towers/bases/`), which are frozen otherwise, even where a
        group's pattern covers them (a tower's own base under share_base=False).
      train_projector: train the towers' projectors; without it a tower trains its LoRA and heads only.
    """
    patterns = [tpad_lib.GROUP_PATTERNS[name] for name in group_names]
    if full_finetune:
        patterns.append(tpad_lib.GROUP_PATTERNS["base"])
    selected = nnx.All(nnx.Param, path_matches("|".join(patterns)))
    if not full_finetune:
        selected = nnx.All(selected, nnx.Not(path_matches("towers/bases/")))
    if not train_projector:
        selected = nnx.All(selected, nnx.Not(nnx.PathContains("projector")))
    return selected


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to 0 at `total_steps`."""
    decay_steps = max(total_steps, warmup_steps + 1)  # optax needs a non-empty decay phase
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, decay_steps, end_value=0.0)


def group_labels(tree, groups: Mapping[str, GroupSchedule]):
    """Labels each leaf of `tree` (nnx.Variables are leaves) with the first group whose pattern matches."""
    compiled = {name: re.compile(group.pattern) for name, group in groups.items()}
    unmatched = []

    def label(path, _):
        text = path_string(path)
        name = next((name for name, regex in compiled.items() if regex.search(text)), None)
        if name is None:
            unmatched.append(text)
        return name

    labels = jax.tree_util.tree_map_with_path(label, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if unmatched:
        raise ValueError(f"trainable parameters match no optimizer group {list(groups)}: {unmatched}")
    return labels


def make_optimizer(groups: Mapping[str, GroupSchedule], grad_clip: float = 0.0,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW with one schedule per parameter group, after global-norm clipping of all gradients.

    Args:
      groups: group name -> schedule; a parameter joins the first group (in order) matching its path.
      grad_clip: maximum global gradient norm; 0 disables clipping.
      weight_decay: decoupled AdamW weight decay.
    """
    per_group = {
        name: optax.adamw(g.schedule(), weight_decay=weight_decay)
        for name, g in groups.items()
    }
    update = optax.multi_transform(per_group, lambda tree: group_labels(tree, groups))
    return optax.chain(optax.clip_by_global_norm(grad_clip), update) if grad_clip > 0 else update
