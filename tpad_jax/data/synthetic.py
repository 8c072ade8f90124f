"""The embedded synthetic multimodal catalogue: planted structure and an exact next-item oracle.

Items have latent attributes: category (12), colour (8), shape (6), material (6), style (4). The title
("Rustic oak lamp by Norden") shows style, material and category; the image shows colour and shape (drawn
in the colour), material (as a texture) and style (as the background tone). Colour is only in the image,
category only in the title, and both drive the sessions, so both modalities matter; shape and brand are
distractors.

Sessions follow a known process. A session draws a latent style s from a uniform prior. The first item v
has probability pop(v) * exp(style_weight [style(v) = s]), normalised over all items. Each next item is,
with probability `noise`, uniform over all items; otherwise its category c' follows the complementarity
graph T[category(v), c'] (stay with STAY_PROBABILITY, else one of the category's 2-3 "next" categories)
and the item v' is drawn within c' with probability proportional to
    pop(v') * exp(style_weight [style(v') = s] + colour_affinity[colour(v), colour(v')]
                  + material_affinity[material(v), material(v')]).
The process is first order in the items given s, and s is discrete, so the exact next-item distribution
given a prefix is the mixture over s weighted by the Bayesian posterior of s given that prefix
(`SessionProcess.next_item_probs`). Session lengths are independent of the items, so conditioning on a
session having a next item changes nothing.

Popularity is a long tail. Warm items get Zipf-like popularity; a `cold_item_fraction` of the catalogue
(the tail) gets a small popularity each, calibrated item by item (`expected_item_counts`, exact under the
process) so that each cold item is expected COLD_EXPECTED_CLICKS times over all sessions: with 81 % of the
sessions in train, mostly 5-9 train occurrences, so cold items pass the protocol's min_item_count = 5 filter
yet stay under its cold_threshold = 10. Their clicks come from the structured process (the noise is small),
so where a cold item goes, and what leads to it, is set by its attributes: its content tells, its ID
history barely does.
"""

import dataclasses
import functools
import os

import numpy as np
from PIL import Image, ImageDraw

from tpad_jax.data import raw

CATEGORIES = ("lamp", "chair", "table", "mug", "vase", "clock", "rug", "bag", "shoe", "hat", "scarf",
              "bottle")
COLOURS = {
    "red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (230, 200, 40),
    "purple": (130, 50, 160), "orange": (235, 130, 30), "black": (30, 30, 30), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
MATERIALS = ("oak", "leather", "glass", "steel", "cotton", "ceramic")
STYLES = ("rustic", "modern", "vintage", "minimal")
STYLE_BACKGROUNDS = ((214, 190, 150), (170, 190, 210), (190, 160, 185), (120, 120, 120))
BRANDS = ("Norden", "Alba", "Kiso", "Veld", "Marlo", "Tesso", "Brill", "Oaken", "Luma", "Corra",
          "Fenwick", "Halde", "Ister", "Juno", "Rasko", "Sable")

STAY_PROBABILITY = 0.3
# Attribute logits large enough to outweigh the popularity spread: a tail item that fits the current item
# (style, colour, material) outranks popular items that do not, so the oracle can rank cold targets.
STYLE_WEIGHT = 3.5
SAME_COLOUR_AFFINITY = 3.5
HARMONY_AFFINITY = 1.75  # each colour also goes well with two others
SAME_MATERIAL_AFFINITY = 3.0
ZIPF_EXPONENT = 0.5
COLD_EXPECTED_CLICKS = 9.0
# Cold counts grow more slowly than their popularity (cold items share normalisers; noise clicks do not
# scale), so each multiplicative round closes about three quarters of the log gap: a few rounds suffice.
CALIBRATION_TOLERANCE = 0.01
MAX_CALIBRATION_ROUNDS = 20
LENGTH_GEOMETRIC_P = 0.3  # session length = 1 + Geometric(p): at least 2, mean 1 + 1/p
MAX_GENERATED_LENGTH = 30
FIRST_TIMESTAMP = 1_600_000_000
SECONDS_BETWEEN_SESSIONS = 600
ROW_CHUNK = 1024


@dataclasses.dataclass
class SessionProcess:
    """The generator's parameters; everything the oracle needs (saved as oracle.npz)."""

    item_ids: np.ndarray  # str [N]
    category: np.ndarray  # int [N]
    colour: np.ndarray
    material: np.ndarray
    style: np.ndarray
    popularity: np.ndarray  # float64 [N]
    category_transition: np.ndarray  # float64 [C, C], rows sum to 1
    colour_affinity: np.ndarray  # float64 [8, 8]
    material_affinity: np.ndarray  # float64 [6, 6]
    noise: float

    def __post_init__(self):
        self.noise = float(self.noise)
        # The next-item weights depend on the current item only through its (colour, material) pair.
        self.pair_key = self.colour * len(MATERIALS) + self.material
        keys = np.arange(len(COLOURS) * len(MATERIALS))
        self.key_weights = np.stack([self._weights(keys // len(MATERIALS), keys % len(MATERIALS), s)
                                      for s in range(len(STYLES))])  # [S, K, N]
        category_onehot = np.eye(len(CATEGORIES))[self.category]
        self._normaliser = self.key_weights @ category_onehot  # [S, K, C], within-category sums

    @property
    def num_items(self):
        return len(self.item_ids)

    def _weights(self, colour, material, style):
        """Unnormalised within-category weights [B, N] of the next item after (colour, material) pairs."""
        logits = (STYLE_WEIGHT * (self.style == style)[None, :]
                  + self.colour_affinity[colour][:, self.colour]
                  + self.material_affinity[material][:, self.material])
        return self.popularity[None, :] * np.exp(logits)

    def first_item_probs(self, style):
        """p(v1 | s): float64 [N]."""
        weights = self.popularity * np.exp(STYLE_WEIGHT * (self.style == style))
        return weights / weights.sum()

    def transition_rows(self, current, style):
        """p(v' | v, s) for each v in `current` (int [B]): float64 [B, N], rows sum to 1."""
        key = self.pair_key[current]
        within = self.key_weights[style][key] / self._normaliser[style][key][:, self.category]
        structured = self.category_transition[self.category[current]][:, self.category] * within
        return self.noise / self.num_items + (1.0 - self.noise) * structured

    def transition_pairs(self, current, following, style):
        """p(following | current, s) elementwise for int arrays of equal shape: float64."""
        logit = (STYLE_WEIGHT * (self.style[following] == style)
                 + self.colour_affinity[self.colour[current], self.colour[following]]
                 + self.material_affinity[self.material[current], self.material[following]])
        within = (self.popularity[following] * np.exp(logit)
                  / self._normaliser[style, self.pair_key[current], self.category[following]])
        structured = self.category_transition[self.category[current], self.category[following]] * within
        return self.noise / self.num_items + (1.0 - self.noise) * structured

    def style_posterior(self, prefixes):
        """p(s | prefix) for each prefix (int arrays of generator indices): float64 [B, S]."""
        firsts = np.array([p[0] for p in prefixes])
        currents = np.concatenate([p[:-1] for p in prefixes])
        followings = np.concatenate([p[1:] for p in prefixes])
        owner = np.repeat(np.arange(len(prefixes)), [len(p) - 1 for p in prefixes])
        log_like = np.zeros((len(prefixes), len(STYLES)))
        for s in range(len(STYLES)):
            log_like[:, s] = np.log(self.first_item_probs(s)[firsts])
            np.add.at(log_like[:, s], owner, np.log(self.transition_pairs(currents, followings, s)))
        log_like -= log_like.max(axis=1, keepdims=True)
        posterior = np.exp(log_like)  # the uniform prior cancels
        return posterior / posterior.sum(axis=1, keepdims=True)

    def next_item_probs(self, prefixes):
        """Exact p(next | prefix) = sum_s p(s | prefix) p(next | last, s): float64 [B, N]."""
        posterior = self.style_posterior(prefixes)
        last = np.array([p[-1] for p in prefixes])
        return sum(posterior[:, s:s + 1] * self.transition_rows(last, s) for s in range(len(STYLES)))

    def next_distribution(self, dist, style):
        """dist @ p(. | ., style) for a distribution over current items, float64 [N] -> [N]."""
        num_categories = len(CATEGORIES)
        mass = np.bincount(self.pair_key * num_categories + self.category, weights=dist,
                           minlength=self.key_weights.shape[1] * num_categories)
        into_category = mass.reshape(-1, num_categories) @ self.category_transition  # [K, C]
        per_weight = (into_category / self._normaliser[style])[:, self.category]  # [K, N]
        structured = np.einsum("kn,kn->n", per_weight, self.key_weights[style])
        return self.noise / self.num_items * dist.sum() + (1.0 - self.noise) * structured

    def save(self, path):
        raw.write_npz(path, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as arrays:
            return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls)})


def oracle_scores(process, prefixes, item_ids):
    """True next-item probabilities over the final item table, for prefixes of item ids.

    The prefix is taken as the model sees it. Where the protocol removed items (rare-item filter, test
    items unseen in train), the remaining items are treated as consecutive, and the probability mass of
    items outside `item_ids` is dropped and the rows renormalised; both are approximations of the exact
    posterior (which would marginalise over the removed clicks), exact whenever nothing was removed.

    Args:
      process: SessionProcess.
      prefixes: list of lists of item ids.
      item_ids: the final item table (row -> item id).
    Returns:
      float32 [len(prefixes), len(item_ids)], rows sum to 1.
    """
    index = {item_id: i for i, item_id in enumerate(process.item_ids.tolist())}
    columns = np.array([index[i] for i in item_ids])
    scores = np.zeros((len(prefixes), len(item_ids)), np.float32)
    for start in range(0, len(prefixes), ROW_CHUNK):
        chunk = [np.array([index[i] for i in p]) for p in prefixes[start:start + ROW_CHUNK]]
        probs = process.next_item_probs(chunk)[:, columns]
        scores[start:start + len(chunk)] = probs / probs.sum(axis=1, keepdims=True)
    return scores


def _colour_affinity(rng):
    affinity = np.eye(len(COLOURS)) * SAME_COLOUR_AFFINITY
    for colour in range(len(COLOURS)):
        for partner in rng.choice(np.delete(np.arange(len(COLOURS)), colour), size=2, replace=False):
            affinity[colour, partner] = affinity[partner, colour] = HARMONY_AFFINITY
    return affinity


def _category_transition(rng):
    num = len(CATEGORIES)
    transition = np.eye(num) * STAY_PROBABILITY
    for category in range(num):
        following = rng.choice(np.delete(np.arange(num), category), size=rng.integers(2, 4), replace=False)
        transition[category, following] = (1.0 - STAY_PROBABILITY) / len(following)
    return transition


def length_survival():
    """P(session length > t) for t = 0 .. MAX_GENERATED_LENGTH - 1: float64."""
    t = np.arange(MAX_GENERATED_LENGTH)
    return np.where(t < 2, 1.0, (1.0 - LENGTH_GEOMETRIC_P) ** np.maximum(t - 1, 0))


def expected_item_counts(process, num_sessions):
    """Expected occurrences of each item in `num_sessions` sampled sessions: float64 [N]."""
    counts = np.zeros(process.num_items)
    for style in range(len(STYLES)):
        dist = process.first_item_probs(style)
        for survival in length_survival():
            counts += survival * dist
            dist = process.next_distribution(dist, style)
    return num_sessions * counts / len(STYLES)


def make_process(num_items, num_sessions, cold_item_fraction, noise, seed):
    """Draws item attributes, popularity and the transition parameters."""
    if num_items < len(CATEGORIES):
        raise ValueError(f"data.synthetic.num_items must be >= {len(CATEGORIES)}, got {num_items}")
    rng = np.random.default_rng(seed)
    # Every category gets items, so every within-category normaliser is positive.
    category = rng.permutation(np.arange(num_items) % len(CATEGORIES))
    colour, material, style = (rng.integers(0, len(names), num_items)
                               for names in (COLOURS, MATERIALS, STYLES))
    popularity = 1.0 / (1.0 + rng.permutation(num_items)) ** ZIPF_EXPONENT
    cold = rng.permutation(num_items)[:int(round(cold_item_fraction * num_items))]
    popularity[cold] = popularity.min()
    parameters = dict(
        item_ids=np.array([f"syn{i:05d}" for i in range(num_items)]), category=category, colour=colour,
        material=material, style=style, category_transition=_category_transition(rng),
        colour_affinity=_colour_affinity(rng),
        material_affinity=np.eye(len(MATERIALS)) * SAME_MATERIAL_AFFINITY, noise=noise)
    process = SessionProcess(popularity=popularity, **parameters)
    # A cold item's expected count depends on its attributes' niche (how many items compete with it), so
    # its popularity is set per item. Where the uniform noise alone gives more clicks than the target, the
    # rounds run out with that item's popularity driven towards zero.
    for _ in range(MAX_CALIBRATION_ROUNDS):
        ratio = COLD_EXPECTED_CLICKS / expected_item_counts(process, num_sessions)[cold]
        if np.all(np.abs(ratio - 1) < CALIBRATION_TOLERANCE):
            break
        scale = np.ones(num_items)
        scale[cold] = ratio
        process = SessionProcess(popularity=process.popularity * scale, **parameters)
    return process


class _GroupedSampler:
    """Draws one outcome per row from many categorical distributions at once.

    The CDF of group g is stored shifted by g in one sorted array, so a single `searchsorted` of g + u
    (u uniform in [0, 1)) samples every row from its own group.
    """

    def __init__(self, probs, outcomes):
        """probs: [G, M] rows summing to 1 over outcomes[g] ([G, M] ints); zero-probability slots allowed."""
        cumulative = np.cumsum(probs, axis=1)
        cumulative /= cumulative[:, -1:]
        self._shifted = (cumulative + np.arange(len(probs))[:, None]).ravel()
        self._outcomes = outcomes.ravel()

    def sample(self, rng, groups):
        position = np.searchsorted(self._shifted, groups + rng.random(len(groups)), side="right")
        return self._outcomes[np.minimum(position, len(self._outcomes) - 1)]


def _within_category_sampler(process):
    """Group (style, colour-material key, category) -> items of that category by their weights."""
    by_category = [np.flatnonzero(process.category == c) for c in range(len(CATEGORIES))]
    width = max(len(items) for items in by_category)
    probs, outcomes = [], []
    for weights in process.key_weights.reshape(-1, process.num_items):  # (style, key) rows
        for items in by_category:
            padding = width - len(items)
            probs.append(np.pad(weights[items] / weights[items].sum(), (0, padding)))
            outcomes.append(np.pad(items, (0, padding), mode="edge"))
    return _GroupedSampler(np.array(probs), np.array(outcomes))


def sample_sessions(process, num_sessions, rng):
    """Runs the process.

    Returns:
      (sessions, styles): list of int arrays of generator item indices, and each session's latent style.
    """
    num_items, num_categories = process.num_items, len(CATEGORIES)
    num_keys = len(COLOURS) * len(MATERIALS)
    styles = rng.integers(0, len(STYLES), num_sessions)
    lengths = np.minimum(1 + rng.geometric(LENGTH_GEOMETRIC_P, num_sessions), MAX_GENERATED_LENGTH)
    first = _GroupedSampler(np.stack([process.first_item_probs(s) for s in range(len(STYLES))]),
                            np.tile(np.arange(num_items), (len(STYLES), 1)))
    next_category = _GroupedSampler(process.category_transition,
                                    np.tile(np.arange(num_categories), (num_categories, 1)))
    within = _within_category_sampler(process)
    clicks = np.zeros((num_sessions, lengths.max()), np.int64)
    clicks[:, 0] = first.sample(rng, styles)
    for step in range(1, lengths.max()):
        active = np.flatnonzero(lengths > step)
        current = clicks[active, step - 1]
        category = next_category.sample(rng, process.category[current])
        group = (styles[active] * num_keys + process.pair_key[current]) * num_categories + category
        chosen = within.sample(rng, group)
        uniform = rng.random(len(active)) < process.noise
        chosen[uniform] = rng.integers(0, num_items, uniform.sum())
        clicks[active, step] = chosen
    return [clicks[i, :lengths[i]] for i in range(num_sessions)], styles


def _shape_polygon(shape, centre, radius, angle):
    """Vertices of `shape` (a circle is a 48-gon)."""
    sides = {"circle": 48, "square": 4, "triangle": 3, "diamond": 4, "hexagon": 6, "star": 10}[shape]
    offset = angle + (np.pi / 4 if shape == "diamond" else 0.0)
    angles = offset + 2 * np.pi * np.arange(sides) / sides
    radii = np.full(sides, radius)
    if shape == "star":
        radii[1::2] *= 0.45  # inner corners
    return [(centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for r, a in zip(radii, angles)]


@functools.lru_cache(maxsize=None)
def _texture(material, size):
    """A [size, size] shading pattern in [0, 1] per material (0 = plain)."""
    y, x = np.mgrid[0:size, 0:size] * (64.0 / size)
    patterns = {
        "oak": (np.sin(y * 1.1 + 2 * np.sin(x * 0.15)) > 0.3),  # wavy grain
        "leather": ((x % 6 < 2) & (y % 6 < 2)),  # dots
        "glass": ((x + y) % 12 < 3),  # diagonal glints
        "steel": (x % 4 < 1),  # brushed vertical lines
        "cotton": ((x // 4 + y // 4) % 2 == 0),  # weave checks
        "ceramic": np.zeros((size, size), bool),  # plain glaze
    }
    return patterns[material].astype(np.float32)


def render_image(colour, shape, material, style, size, rng):
    """The item image: `shape` in `colour`, textured by `material`, on the `style` background."""
    background = Image.new("RGB", (size, size), STYLE_BACKGROUNDS[style])
    base = np.array(list(COLOURS.values())[colour], np.float32)
    shading = 1.0 - 0.35 * _texture(MATERIALS[material], size)[..., None] * (1 if base.mean() > 60 else -1.5)
    foreground = Image.fromarray(np.clip(base * shading, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    centre = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    radius = size * rng.uniform(0.28, 0.4)
    ImageDraw.Draw(mask).polygon(_shape_polygon(SHAPES[shape], centre, radius, rng.uniform(0, 0.3)), fill=255)
    background.paste(foreground, (0, 0), mask)
    return background


def generate(out_dir, *, num_items, num_sessions, cold_item_fraction, noise, seed, image_size):
    """Writes the catalogue (items.jsonl, sessions.jsonl, images/*.png) and oracle.npz into `out_dir`."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    process = make_process(num_items, num_sessions, cold_item_fraction, noise, seed)
    rng = np.random.default_rng([seed, 1])
    shapes = rng.integers(0, len(SHAPES), num_items)
    brands = rng.integers(0, len(BRANDS), num_items)
    items = []
    for i, item_id in enumerate(process.item_ids.tolist()):
        image = os.path.join("images", f"{item_id}.png")
        render_image(process.colour[i], shapes[i], process.material[i], process.style[i], image_size,
                     np.random.default_rng([seed, 2, i])).save(os.path.join(out_dir, image))
        title = (f"{STYLES[process.style[i]].capitalize()} {MATERIALS[process.material[i]]} "
                 f"{CATEGORIES[process.category[i]]} by {BRANDS[brands[i]]}")
        items.append(raw.Item(item_id, title, CATEGORIES[process.category[i]], image))
    sampled, _ = sample_sessions(process, num_sessions, np.random.default_rng([seed, 3]))
    timestamps = FIRST_TIMESTAMP + SECONDS_BETWEEN_SESSIONS * np.arange(num_sessions)
    sessions = [raw.Session(f"s{n:06d}", process.item_ids[clicks].tolist(), int(timestamps[n]))
                for n, clicks in enumerate(sampled)]
    raw.write_items(os.path.join(out_dir, "items.jsonl"), items)
    raw.write_sessions(os.path.join(out_dir, "sessions.jsonl"), sessions)
    process.save(os.path.join(out_dir, "oracle.npz"))
    return process
