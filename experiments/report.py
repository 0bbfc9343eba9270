"""The one report writer of the experiments: strict JSON (non-finite floats
become null), a CSV of the rows, tables (markdown or aligned text) and what
gets printed.

    write_report(out, record=record, rows=rows, table=markdown)   # the comparison
    format_interval(0.717, [0.695, 0.739])   # "0.717 [0.695, 0.739]"
    write_report(out, record=record, json_name="curvature.json", summary=text)
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys

import jax
import numpy as np

import gujax
from gujax import files


def jsonable(value):
    """``value`` with numpy/jax arrays and scalars as lists and numbers,
    tuples as lists, keys as strings and NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__jax_array__"):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finite_or_none(x) -> float | None:
    """float, or None for NaN/inf (JSON null, "-" in tables)."""
    x = float(x)
    return x if math.isfinite(x) else None


def write_json(path: str, record: dict) -> None:
    """Strict JSON (no NaN/Infinity tokens)."""
    files.write_json(path, jsonable(record), indent=1, allow_nan=False)


def write_csv(path: str, rows: list[dict]) -> None:
    """One line per row, the union of the rows' keys as columns; dict, list
    and array values (e.g. a [lo, hi] interval) as JSON text."""
    flat = [{k: (json.dumps(jsonable(v)) if isinstance(v, (dict, list, tuple, np.ndarray))
                 else v) for k, v in r.items()} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with files.atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)


def format_interval(value, interval, fmt: str = "{:.3f}") -> str:
    """"value [lo, hi]" with each number in ``fmt``; "-" for a missing or
    non-finite value, the value alone without a finite interval."""
    def finite(x):
        return x is not None and math.isfinite(float(x))

    if not finite(value):
        return "-"
    if interval is None or len(interval) != 2 or not all(finite(x) for x in interval):
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def format_table(rows: list[dict], columns, *, markdown: bool = False) -> str:
    """A table of ``rows``; ``columns`` = (header, key, format) triples. A
    missing, None or non-finite value prints as "-". Markdown (``| a | b |``)
    or plain text with right-aligned columns."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return fmt.format(value)

    header = [h for h, _, _ in columns]
    body = [[cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) for text, w in zip(line, widths))
             for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    """What every record carries about the software and the run."""
    return {"gujax_version": gujax.__version__, "jax_version": jax.__version__,
            "backend": jax.default_backend(), "command": " ".join(sys.argv)}


def write_report(out: str, *, record: dict, json_name: str = "results.json",
                 rows: list[dict] | None = None, table: str | None = None,
                 summary: str | None = None, printed: str | None = None) -> None:
    """Write ``record`` to <out>/<json_name>, ``rows`` to results.csv, the
    markdown ``table`` to table.md and the text ``summary`` to summary.txt
    (each when given); print ``printed`` (default: the table or the summary;
    e.g. the table without the details table.md keeps) and where it all is."""
    write_json(os.path.join(out, json_name), record)
    if rows is not None:
        write_csv(os.path.join(out, "results.csv"), rows)
    for name, text in (("table.md", table), ("summary.txt", summary)):
        if text is not None:
            files.write_text(os.path.join(out, name), text)
    for text in (printed,) if printed is not None else (table, summary):
        if text is not None:
            print(text)
    print(f"results in {out}")
