"""Batch registration: many pairs from a pairs file with one model load (``vtn-register --pairs``).

The pairs file (`vtn_tf.io.pairs`): a header ``fixed,moving,out[,moving_labels][,fixed_labels]`` in any
column order, one row per pair; paths relative to its folder or absolute. Each row is
registered by :func:`register_pair` under its output folder's lock (`vtn_tf.io.folder_lock`):

* a folder already complete with the same model, settings and inputs (its completion record,
  `vtn_tf.io.completion`) is skipped, unless ``overwrite``: a batch started again resumes;
* a folder made with another model, settings or inputs is refused unless ``overwrite``;
* a row that fails is reported on one line and skipped; a full disk stops the batch
  (`vtn_tf.io.faults`, which also gives the exit statuses).

After the rows, the cohort summary of the whole pairs file (every shard's rows) is rebuilt
from the output folders' records and written beside it (:func:`summarise`).
"""

import collections
import csv
import dataclasses
import io as text_io
import json
import os
import sys
import time

from vtn_tf import io
from vtn_tf.io import completion, faults, folder_lock, pairs

read_pairs = pairs.read_pairs
SUMMARY_COLUMNS = ("line", "fixed", "moving", "out", "state", "checkpoint", "model_sha256", "seconds",
                   "suspect", "qc_flags")


@dataclasses.dataclass
class Outcome:
    """What a batch did: rows ``registered`` and ``skipped`` (already complete), ``failures``
    (``(row, error)``), ``not_attempted`` after a full disk; ``status``: the exit status."""

    registered: int = 0
    skipped: int = 0
    failures: list = dataclasses.field(default_factory=list)
    not_attempted: int = 0

    @property
    def status(self):
        if any(getattr(error, "stops_batch", False) for _, error in self.failures):
            return faults.DISK_FULL
        return faults.PAIRS_FAILED if self.failures else faults.OK


def record_inputs(fixed, moving, moving_labels=(), fixed_labels=()):
    """The inputs as the completion record holds them: absolute paths."""
    def absolute(paths):
        return [os.path.abspath(p) for p in paths]

    return {"fixed": os.path.abspath(fixed), "moving": os.path.abspath(moving),
            "moving_labels": absolute(moving_labels), "fixed_labels": absolute(fixed_labels)}


def state(registrar, fixed, moving, out, moving_labels=(), fixed_labels=()):
    """``(state, reason)`` of ``out`` against this registrar's model and settings and these
    inputs (:func:`vtn_tf.io.completion.status`): ``complete`` folders need no work."""
    return completion.status(out, completion.model_identity(registrar.run_dir, registrar.checkpoint),
                             registrar.settings.to_json(), record_inputs(fixed, moving, moving_labels, fixed_labels))


def register_pair(registrar, fixed, moving, out, moving_labels=(), overwrite=False, fixed_labels=(), inputs=None):
    """:meth:`~vtn_tf.registration.pipeline.Registrar.register_files` between the completion
    record's removal and its writing, after every output (`vtn_tf.io.completion`); the OSErrors
    of a full disk or an unwritable folder become `vtn_tf.io.faults.Fault` s. The caller holds
    the folder's lock. Returns what ``register_files`` returns."""
    with faults.output_faults(out):
        if os.path.isdir(out):
            completion.clear(out)
        done = registrar.register_files(fixed, moving, out, moving_labels, overwrite, fixed_labels, inputs)
        names = [os.path.basename(path) for path in done[0]]
        record = completion.make_record(completion.model_identity(registrar.run_dir, registrar.checkpoint),
                                        registrar.settings.to_json(),
                                        record_inputs(fixed, moving, moving_labels, fixed_labels), names, done[2])
        completion.write(out, record)
    return done


def register_call(load, settings, fixed, moving, out, moving_labels=(), fixed_labels=(), overwrite=False):
    """One ``vtn-register FIXED MOVING --out OUT`` call, in a fresh process or in a server
    (`vtn_tf.serving.warm`): the outputs and the inputs checked before the model is
    loaded, then :func:`register_pair` under the folder's lock (a second process refuses it
    at once). ``load()`` returns the `vtn_tf.registration.pipeline.Registrar` to use, with
    ``settings``. Returns what :func:`register_pair` returns."""
    from vtn_tf.registration import outputs, pipeline

    outputs.check_outputs(out, moving_labels, overwrite, settings.output.compression, settings.output.inverse,
                          fixed_labels, settings.output.qc)
    with faults.output_faults(out), folder_lock.locked(out):
        inputs = pipeline.read_inputs(fixed, moving, moving_labels)  # bad files refused before the model loads
        return register_pair(load(), fixed, moving, out, moving_labels, overwrite, fixed_labels, inputs)


def register_row(registrar, row, overwrite=False):
    """Register one row under its folder's lock: None when it was complete and is skipped,
    else ``(written, result, seconds per part)``. Raises InputError (a `vtn_tf.io.faults.Fault`
    for a full disk or an unwritable folder, `vtn_tf.io.folder_lock.FolderBusy` for a busy one)."""
    out = row["out"]
    io.check_output_folder(out, overwrite=True)  # a path under a file: refused before its lock is made
    with faults.output_faults(out), folder_lock.locked(out):
        fixed_labels = row.get("fixed_labels", ())
        found, reason = state(registrar, row["fixed"], row["moving"], out, row["moving_labels"], fixed_labels)
        if found == completion.COMPLETE and not overwrite:
            return None
        if found == completion.DIFFERENT and not overwrite:
            raise io.InputError(f"output folder {out} was {reason}; pass --overwrite to replace it")
        return register_pair(registrar, row["fixed"], row["moving"], out, row["moving_labels"], overwrite,
                             fixed_labels)


def run(registrar, rows, overwrite=False, stream=sys.stdout, all_rows=None, summary=None):
    """Register every row; prints a progress bar and one line per pair, then the totals.

    Args:
      registrar: a `vtn_tf.registration.pipeline.Registrar` (it logs the details).
      rows: the rows to register (a shard's: :func:`vtn_tf.io.pairs.shard`).
      overwrite: redo complete folders and replace any outputs.
      stream: where the progress lines go.
      all_rows: the whole pairs file's rows (an output folder named by two rows is refused on
        the second); ``rows`` when None.
      summary: the pairs file whose cohort summary is rebuilt at the end (:func:`summarise`),
        or None.

    Returns:
      An :class:`Outcome`.
    """
    shared = pairs.shared_outputs(all_rows or rows)
    outcome = Outcome()
    began = time.perf_counter()
    for k, row in enumerate(rows, start=1):
        start, stop = time.perf_counter(), False
        name = f"{os.path.basename(row['fixed'])} <- {os.path.basename(row['moving'])}"
        try:
            if row["line"] in shared:
                raise io.InputError(f"output folder {row['out']} is also line {shared[row['line']]}'s; "
                                    "each pair needs its own")
            done = register_row(registrar, row, overwrite)
            if done is None:
                outcome.skipped += 1
                status = f"complete (same model, settings and inputs), skipped -> {row['out']}"
            else:
                outcome.registered += 1
                status = f"ok, {time.perf_counter() - start:.2f} s (" + ", ".join(
                    f"{key} {value:.2f}" for key, value in done[2].items()) + f") -> {row['out']}"
        except io.InputError as error:
            outcome.failures.append((row, error))
            status = f"FAILED: {io.error_line(error)}"
            stop = getattr(error, "stops_batch", False)
        bar = "#" * int(20 * k / len(rows))
        print(f"[{bar:<20}] {k}/{len(rows)} line {row['line']}: {name}: {status}", file=stream, flush=True)
        if stop:
            outcome.not_attempted = len(rows) - k
            break
    total = time.perf_counter() - began
    if summary is not None:
        summarise(all_rows or rows, summary, stream)
    per_pair = f" ({total / outcome.registered:.2f} s per registered pair)" if outcome.registered else ""
    stopped = (f"; the batch stopped at a full disk, {outcome.not_attempted} pairs not attempted"
               if outcome.status == faults.DISK_FULL else "")
    print(f"{outcome.registered} of {len(rows)} pairs registered in {total:.1f} s{per_pair}; {outcome.skipped} "
          f"skipped (already complete); {len(outcome.failures)} failed{stopped}", file=stream, flush=True)
    return outcome


def summary_path(pairs_path):
    """Where the cohort summary of ``pairs_path`` goes: ``NAME.summary.csv`` beside it."""
    return os.path.splitext(os.fspath(pairs_path))[0] + ".summary.csv"


def _qc(out):
    """The folder's ``qc.json`` (quality control's figures) as a dict, or None."""
    try:
        with open(os.path.join(out, "qc.json"), encoding="utf-8") as stream:
            figures = json.load(stream)
    except (OSError, ValueError):
        return None
    return figures if isinstance(figures, dict) else None


def summary_rows(rows):
    """One dict per row (:data:`SUMMARY_COLUMNS`), from its output folder's record alone."""
    table = []
    for row in rows:
        state, _, record = completion.recorded_state(row["out"])
        record = record or {}
        model = record.get("model", {})
        seconds = sum(v for v in record.get("seconds", {}).values() if isinstance(v, (int, float)))
        qc = _qc(row["out"])
        flags = ";".join(str(f.get("flag", "")) for f in (qc or {}).get("flags", []) if isinstance(f, dict))
        table.append({"line": row["line"], "fixed": row["fixed"], "moving": row["moving"], "out": row["out"],
                      "state": state, "checkpoint": model.get("checkpoint", ""),
                      "model_sha256": model.get("sha256", "")[:12], "seconds": f"{seconds:.2f}" if record else "",
                      "suspect": "" if qc is None else str(bool(qc.get("suspect"))).lower(), "qc_flags": flags,
                      "qc": qc,
                      "made_with": json.dumps([model.get("sha256"), record.get("settings")], sort_keys=True)})
    return table


def summarise(rows, pairs_path, stream=None):
    """Rebuild the cohort summary of a pairs file from its output folders (every shard's) and
    write it to :func:`summary_path` (CSV, :data:`SUMMARY_COLUMNS`); prints one line. Returns
    the rows. A summary that cannot be written is reported, not raised."""
    stream = stream or sys.stdout
    table = summary_rows(rows)
    states = collections.Counter(entry["state"] for entry in table)
    made_with = {entry["made_with"] for entry in table if entry["state"] == completion.COMPLETE}
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    path = summary_path(pairs_path)
    try:
        io.atomic_write_text(path, buffer.getvalue(), overwrite=True)
        where = f"written to {path}"
    except (OSError, io.InputError) as error:
        where = f"not written ({io.error_line(error)})"
    others = ", ".join(f"{n} {state}" for state, n in sorted(states.items()) if state != completion.COMPLETE)
    mixed = (f"; made with {len(made_with)} different models or settings (its model_sha256 column)"
             if len(made_with) > 1 else "")
    suspects = sum(entry["suspect"] == "true" for entry in table)
    flagged = f"; {suspects} flagged suspect by quality control" if suspects else ""
    print(f"cohort summary: {states[completion.COMPLETE]} of {len(table)} pairs complete"
          f"{f' ({others})' if others else ''}{mixed}{flagged}; {where}", file=stream, flush=True)
    if any(entry["qc"] is not None for entry in table):
        _qc_report(table, pairs_path, stream)
    return table


def _qc_report(table, pairs_path, stream):
    """Rebuild quality control's cohort report (``report.html``, ``report.csv`` beside the
    pairs file, `vtn_tf.qc.report`) from the folders' ``qc.json`` and ``qc.png``."""
    from vtn_tf.qc import report

    folder = os.path.dirname(os.path.abspath(pairs_path))
    entries = [{"name": os.path.relpath(entry["out"], folder), "qc": entry["qc"],
                "picture": os.path.join(entry["out"], "qc.png") if entry["qc"] is not None else "",
                "error": None if entry["qc"] is not None else f"no quality control ({entry['state']})"}
               for entry in table]
    try:
        paths = report.write(folder, entries)
        print(f"quality control report rebuilt: {', '.join(paths)}", file=stream, flush=True)
    except OSError as error:
        print(f"quality control report not written ({io.error_line(error)})", file=stream, flush=True)
