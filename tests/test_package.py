"""The package is installed, not patched in: no source edits sys.path, and pyproject.toml ships every subpackage."""

import ast
import fnmatch
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("launch", "benchmarks", "tests", "tpad_jax")


def is_sys_path(node) -> bool:
    """`sys.path`, or a subscript of it (`sys.path[:0]`)."""
    if isinstance(node, ast.Subscript):
        node = node.value
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def sys_path_patches(source: str) -> list[int]:
    """Line numbers of the calls and assignments in `source` that change sys.path."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            lines.append(node.lineno)  # insert, append, extend, remove, ...
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            lines += [node.lineno for target in targets if is_sys_path(target)]
    return lines


def test_no_source_patches_sys_path():
    patched = {}
    for name in SOURCE_DIRS:
        for path in sorted((ROOT / name).rglob("*.py")):
            if lines := sys_path_patches(path.read_text(encoding="utf-8")):
                patched[str(path.relative_to(ROOT))] = lines
    assert not patched, f"these change sys.path (file: lines); import the installed package instead: {patched}"


def test_the_scan_finds_the_usual_patches():
    for source in ("sys.path.insert(0, ROOT)", "if True:\n    sys.path.append(ROOT)", "sys.path[:0] = [ROOT]",
                   "sys.path += [ROOT]", "sys.path = [ROOT]"):
        assert sys_path_patches(source), source
    assert not sys_path_patches('"""sys.path.insert(0, ROOT) in prose"""\nprint(sys.path, sys.path[0])')


def test_pyproject_ships_every_subpackage():
    with open(ROOT / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    code_dirs = {path.parent for path in (ROOT / "tpad_jax").rglob("*.py") if "__pycache__" not in path.parts}
    # setuptools' find skips a directory without __init__.py, and everything below it
    assert not [str(d.relative_to(ROOT)) for d in code_dirs if not (d / "__init__.py").exists()]
    packages = {".".join(d.relative_to(ROOT).parts) for d in code_dirs}
    assert {"tpad_jax", "tpad_jax.models", "tpad_jax.train"} <= packages
    missed = [p for p in sorted(packages) if not any(fnmatch.fnmatchcase(p, pattern) for pattern in include)]
    assert not missed, f"pyproject.toml's packages.find include leaves out {missed}"
