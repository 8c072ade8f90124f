"""What every benchmark script shares: timing, JSON lines, dated RESULTS.md rows.

    from common import emit, median_time, record_rows   # benchmarks/ is the script's directory

Each measurement is printed as one JSON line (`emit`, or `emit_row` for a row keyed by table columns),
so runs can be collected with `grep '^{'`, and each script appends one dated row per measurement to the
table of its own section in RESULTS.md (`append_results`, or `record_rows` to add the `machine` column
too), creating the section the first time. Benchmarks that prepare data cache it in
`default_workdir(preset)`, under the system's temporary directory.
"""

import ast
import datetime
import json
import os
import pathlib
import platform
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine() -> str:
    """A short description of this machine for the results rows."""
    return f"{os.cpu_count()} cpu, {platform.machine()}, python {platform.python_version()}"


def default_workdir(preset: str) -> str:
    """The data cache a benchmark prepares `preset`'s synthetic data into unless given `--workdir`."""
    return os.path.join(tempfile.gettempdir(), f"tpad_bench_{preset}")


def apply_overrides(config, overrides: list[str]):
    """Sets `KEY=VALUE` overrides (as `--config.KEY=VALUE` would) on an ml_collections config.

    VALUE is read as a Python literal (`8`, `None`, `'bfloat16'`), else taken as a string.
    """
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"--set {override!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config.update_from_flattened_dict({key: value})
    return config


def emit(**fields) -> dict:
    """Prints one measurement as a JSON line (with the date) and returns it."""
    record = {"date": datetime.date.today().isoformat(), **fields}
    print(json.dumps(record, sort_keys=False), flush=True)
    return record


def emit_row(benchmark: str, row: dict) -> dict:
    """`emit`s a results row (keyed by table columns) and returns the row unchanged.

    Columns become JSON field names: "items/s" -> "items_per_s", "step s" -> "step_s", "MFU %" -> "MFU_pct".
    """
    emit(benchmark=benchmark, **{key.replace(" ", "_").replace("/", "_per_").replace("%", "pct"): value
                                 for key, value in row.items()})
    return row


def median_time(fn, steps: int, warmup: int = 2, sync=None) -> tuple[float, float, list[float]]:
    """(median seconds of `fn()` over `steps` calls, seconds of the first call, all step times).

    The first of the `warmup` calls includes compilation; `sync(result)` waits for asynchronous work
    (e.g. `jax.block_until_ready`).
    """
    sync = sync or (lambda result: result)
    start = time.perf_counter()
    sync(fn())
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], first_s, times


def append_results(section: str, columns: list[str], rows: list[dict], note: str | None = None) -> None:
    """Appends `rows` (dicts over `columns`) to the table under `## <section>` in RESULTS.md.

    The section and its header row are created at the end of the file when missing; a `date` column is
    always first. `note` (one paragraph) is written under a newly created heading only.
    """
    columns = ["date"] + [c for c in columns if c != "date"]
    today = datetime.date.today().isoformat()
    lines = RESULTS.read_text(encoding="utf-8").splitlines() if RESULTS.exists() else ["# Benchmark results"]
    heading = f"## {section}"
    new_rows = ["| " + " | ".join(_cell(row.get(c, today if c == "date" else "")) for c in columns) + " |"
                for row in rows]
    if heading not in lines:
        block = ["", heading, ""] + ([note, ""] if note else [])
        block += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + new_rows
        lines += block
    else:
        # Insert after the last table row of this section.
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        last_row = max((i for i in range(start, end) if lines[i].startswith("|")), default=end - 1)
        lines[last_row + 1:last_row + 1] = new_rows
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")


def record_rows(section: str, columns: list[str], rows: list[dict], note: str | None = None) -> None:
    """Sets each row's `machine` column to `machine()`, then `append_results(section, ...)`."""
    for row in rows:
        row["machine"] = machine()
    append_results(section, columns, rows, note=note)


def print_and_record(section: str, columns: list[str], rows: list[dict], note: str | None, record: bool) -> None:
    """Prints `rows` as a Markdown table of `columns` but the last (`machine`), then `record_rows` them
    when `record`."""
    shown = columns[:-1]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row[c]) for c in shown) + " |" for row in rows]
    print("\n".join(lines))
    if record:
        record_rows(section, columns, rows, note=note)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
