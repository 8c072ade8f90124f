"""The package's layers import only downward (docs/architecture.md, "Layers").

Read from the source with `ast`, function-level imports included: a lazy import inside a function is
still a dependency.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tpad_jax"

# Each module's layer, by its dotted name (the longest matching prefix decides), bottom to top.
LAYER_OF = {
    "tpad_jax.cli": "base", "tpad_jax.workdir": "base", "tpad_jax.layout": "base", "tpad_jax.rows": "base",
    "tpad_jax.parallel": "parallel",
    "tpad_jax.data": "data",
    "tpad_jax.eval": "eval",
    "tpad_jax.models": "models", "tpad_jax.pretrained": "models",
    "tpad_jax.train": "train", "tpad_jax.export": "train", "tpad_jax.provenance": "train",
    "tpad_jax.sentence_features": "train",
    "tpad_jax.downstream": "downstream",
    "tpad_jax.runner": "drivers", "tpad_jax.evaluate": "drivers", "tpad_jax.seeds": "drivers",
    "tpad_jax.recommender": "drivers", "tpad_jax.new_items": "drivers", "tpad_jax": "drivers",
}
# The layers each layer may import (its own included). data knows no models; eval is a leaf that
# imports neither training nor the drivers; the drivers sit above everything.
ALLOWED = {
    "base": {"base"},
    "parallel": {"base", "parallel"},
    "data": {"base", "data"},
    "eval": {"base", "data", "eval"},
    "models": {"base", "parallel", "data", "models"},
    "train": {"base", "parallel", "data", "eval", "models", "train"},
    "downstream": {"base", "parallel", "data", "eval", "models", "train", "downstream"},
    "drivers": {"base", "parallel", "data", "eval", "models", "train", "downstream", "drivers"},
}


def layer(module: str) -> str:
    prefix = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF[prefix]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported tpad_jax module) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tpad_jax.data import raw` imports tpad_jax.data.raw when raw is a module.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_module = PACKAGE.parent.joinpath(*candidate.split("."))
                found.append((node.lineno, candidate if as_module.with_suffix(".py").exists()
                              or as_module.is_dir() else node.module))
    return [(line, name) for line, name in found if name == "tpad_jax" or name.startswith("tpad_jax.")]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, imported in imports_of(path):
            if imported == "tpad_jax":
                continue  # the package's own __init__ holds only the lazy Recommender export
            if layer(imported) not in ALLOWED[layer(importer)]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} ({layer(importer)}) "
                                f"imports {imported} ({layer(imported)})")
    return problems


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        assert layer(module_name(path)) in ALLOWED


def test_no_layer_imports_upward():
    assert upward_imports() == []


@pytest.mark.parametrize("source, expected", [
    ("from tpad_jax.data import raw\n", ["tpad_jax.data.raw"]),
    ("def f():\n    from tpad_jax.train import loop  # noqa\n", ["tpad_jax.train.loop"]),
    ("import tpad_jax.models.llm as llm\n", ["tpad_jax.models.llm"]),
    ("from tpad_jax.cli import UserError\n", ["tpad_jax.cli"]),
    ("import numpy as np\nfrom . import x\n", []),
])
def test_the_scan_sees_every_form_of_import(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert [name for _, name in imports_of(path)] == expected
