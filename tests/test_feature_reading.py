"""benchmarks/feature_reading.py: W's reading profile and its gain on stage 2's change, against cases
whose answers follow from the construction (a W that reads one principal direction, or all alike)."""

import importlib
import pathlib

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
D = 24


@pytest.fixture(scope="module")
def reading():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # benchmarks/ is a folder of scripts that import `common`
        return importlib.import_module("feature_reading")


@pytest.fixture(scope="module")
def catalogue():
    """Features far from the origin, as exports are, and their sample principal directions (columns,
    variance falling with the index)."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0]
    x = (rng.normal(size=(4000, D)) * np.linspace(8.0, 1.0, D)) @ basis.T + 5.0
    variances, vectors = np.linalg.eigh(np.cov(x.T, bias=True))
    return x, vectors[:, ::-1]


def _kernel_reading(x, directions):
    """A W [D, k] that passes exactly the given directions of the raw features once whitened: its rows
    are the whitened images of those directions."""
    variances, vectors = np.linalg.eigh(np.cov(x.T, bias=True))
    kernel = np.zeros((D, len(directions)))
    for j, direction in enumerate(directions):
        image = (direction @ vectors) / np.sqrt(variances)
        kernel[:, j] = image / np.linalg.norm(image)
    return kernel


def test_a_map_that_reads_the_top_directions_puts_all_its_energy_there(reading, catalogue):
    x, basis = catalogue
    top = reading.reading_profile(_kernel_reading(x, basis[:, :3].T), x, "whiten", ks=(3, 8))
    bottom = reading.reading_profile(_kernel_reading(x, basis[:, -3:].T), x, "whiten", ks=(3, 8))
    assert top == pytest.approx([1.0, 1.0], abs=1e-3)
    assert bottom == pytest.approx([0.0, 0.0], abs=1e-3)


def test_an_isotropic_map_reads_k_of_d(reading, catalogue):
    x, _ = catalogue
    profile = reading.reading_profile(np.eye(D), x, "whiten", ks=(6, 12))
    assert profile == pytest.approx([6 / D, 12 / D], abs=1e-6)


def test_stage2_gain_is_d_along_the_only_read_direction_zero_across_and_one_when_isotropic(reading, catalogue):
    x, basis = catalogue
    rng = np.random.default_rng(1)
    moved = x + np.outer(rng.normal(size=len(x)), basis[:, 2])  # stage 2 moves one principal direction
    along = _kernel_reading(x, basis[:, 2:3].T)
    across = _kernel_reading(x, basis[:, 5:6].T)
    # gain = (||delta W||^2 / ||delta||^2) / (||W||^2 / D): W of unit norm along delta passes all of it.
    assert reading.stage2_gain(along, x, "whiten", x, moved)[0] == pytest.approx(D, rel=1e-3)
    assert reading.stage2_gain(across, x, "whiten", x, moved)[0] == pytest.approx(0.0, abs=1e-6)
    assert reading.stage2_gain(np.eye(D), x, "whiten", x, moved)[0] == pytest.approx(1.0, rel=1e-6)


def test_stage2_share_is_the_moved_directions_variance_over_the_whitened_total(reading, catalogue):
    x, basis = catalogue
    rng = np.random.default_rng(2)
    sigma = np.sqrt(np.cov(x.T, bias=True) @ basis[:, 3] @ basis[:, 3])  # the std along that direction
    moved = x + np.outer(0.5 * sigma * rng.normal(size=len(x)), basis[:, 3])
    # Whitened, the direction has variance 1 of the D directions' total D (up to the damping of the
    # smallest variances), and the change has a quarter of it: share = 0.25 / D.
    _, share = reading.stage2_gain(np.eye(D), x, "whiten", x, moved)
    assert share == pytest.approx(0.25 / D, rel=0.1)
