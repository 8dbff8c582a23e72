"""Batch registration: many pairs from a CSV with one model load (``vtn-register --pairs``).

The CSV has the header row ``fixed,moving,out`` and an optional ``moving_labels`` column
holding one or more label files separated by ``;``. Paths are relative to the CSV's folder
or absolute. Each row is registered with :meth:`vtn_tf.registration.pipeline.Registrar.register_files`;
a row that fails is reported on one line and skipped.
"""

import csv
import os
import sys
import time

from vtn_tf import io

REQUIRED = ("fixed", "moving", "out")


def read_pairs(path):
    """Rows ``{"fixed", "moving", "out", "moving_labels": [...], "line": n}`` of a pairs CSV.

    Raises io.InputError naming the file for a missing file, a missing column or no rows.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise io.InputError(f"pairs file {path} does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in REQUIRED if name not in header]
        if missing:
            raise io.InputError(f"pairs file {path} has no column {missing[0]!r} (the header must be "
                                "fixed,moving,out[,moving_labels])")
        rows = []
        for number, raw in enumerate(reader, start=2):
            row = {key.strip(): (value or "").strip() for key, value in raw.items() if key}

            def resolve(value):
                return value if os.path.isabs(value) else os.path.join(folder, value)

            labels = [resolve(v.strip()) for v in row.get("moving_labels", "").split(";") if v.strip()]
            rows.append({"fixed": resolve(row["fixed"]), "moving": resolve(row["moving"]),
                         "out": resolve(row["out"]), "moving_labels": labels, "line": number})
    if not rows:
        raise io.InputError(f"pairs file {path} holds no pairs")
    return rows


def run(registrar, rows, overwrite=False, compression=1, log=None, stream=sys.stdout):
    """Register every row; prints a progress bar and one line per pair. Returns the failures."""
    failures = []
    began = time.perf_counter()
    for k, row in enumerate(rows, start=1):
        start = time.perf_counter()
        name = f"{os.path.basename(row['fixed'])} <- {os.path.basename(row['moving'])}"
        try:
            _, result, parts = registrar.register_files(row["fixed"], row["moving"], row["out"],
                                                        row["moving_labels"], overwrite, compression)
            status = f"ok, {time.perf_counter() - start:.2f} s (" + ", ".join(
                f"{key} {value:.2f}" for key, value in parts.items()) + f") -> {row['out']}"
        except io.InputError as error:
            failures.append((row, str(error)))
            status = f"FAILED: {io.error_line(error)}"
        bar = "#" * int(20 * k / len(rows))
        print(f"[{bar:<20}] {k}/{len(rows)} line {row['line']}: {name}: {status}", file=stream, flush=True)
    total = time.perf_counter() - began
    print(f"{len(rows) - len(failures)} of {len(rows)} pairs registered in {total:.1f} s "
          f"({total / len(rows):.2f} s per pair); {len(failures)} failed", file=stream, flush=True)
    return failures
