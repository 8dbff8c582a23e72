"""The pairs file of batch registration (``vtn-register --pairs``), read as people write it.

A pairs file is CSV text with a header row naming the columns ``fixed``, ``moving`` and
``out`` (required) and ``moving_labels`` and ``fixed_labels`` (optional: one or more label
files separated by ``;``; fixed labels are scored by the quality check and carried into the
moving space with the inverse), in any order and any letter case. It may come from a spreadsheet: a UTF-8
byte-order mark, CRLF line ends, quoted cells (paths holding commas or spaces), blank lines
(also rows of empty cells, as spreadsheets write them) and comment lines starting with ``#``
are all accepted; the separator is a comma, or a semicolon or tab when the header holds no
comma (spreadsheets in some locales). Other columns (a subject id, notes) are ignored unless
their name looks like a misspelt known one. Paths are relative to the pairs file's folder,
or absolute; ``~`` is the home folder.

Anything else raises :class:`vtn_tf.io.InputError` with one line naming the file, the line
and the problem: ``pairs file cohort.csv, line 7: 5 cells, but the header has 4 (quote a path
holding the separator: "a,b.nii.gz")``.

``--shard K/N`` (:func:`parse_shard`, :func:`shard`) keeps the pairs whose index (0-based,
counting pairs only) is K modulo N: the N shards are disjoint, together they are the whole
file, and rows appended to the file later join shards without moving earlier pairs.
"""

import csv
import difflib
import os

from vtn_tf.io.errors import InputError

REQUIRED = ("fixed", "moving", "out")
OPTIONAL = ("moving_labels", "fixed_labels")
COLUMNS = REQUIRED + OPTIONAL
_SEPARATORS = (",", ";", "\t")


def _problem(path, line, text):
    return InputError(f"pairs file {path}, line {line}: {text}")


def _decode(path, payload):
    if payload.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"pairs file {path} is UTF-16 text; save it as CSV UTF-8 (comma-separated)")
    try:
        return payload.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = payload[:error.start].count(b"\n") + 1
        raise _problem(path, line, f"not UTF-8 text (byte 0x{payload[error.start]:02x}); save the file "
                       "as CSV UTF-8") from None


def _content_lines(text):
    """The physical lines, comment lines blanked (line numbers kept)."""
    lines = text.splitlines(keepends=True)
    return ["\n" if line.lstrip().startswith("#") else line for line in lines]


def _header(path, lines):
    """``(line number, separator)`` of the header: the first line with content."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            separator = next((s for s in _SEPARATORS if s in line), ",")
            return number, separator
    raise InputError(f"pairs file {path} is empty (a header fixed,moving,out[,moving_labels] and one row "
                     "per pair are required)")


def _columns(path, line, names):
    """``{column: cell index}`` of the known columns and ``"width"``: the header's cell count.
    Refuses duplicates, misspellings and missing required columns."""
    found = {}
    for index, raw in enumerate(names):
        name = raw.strip().lower()
        if name in COLUMNS:
            if name in found:
                raise _problem(path, line, f"the column {name!r} appears twice")
            found[name] = index
        elif name:
            close = difflib.get_close_matches(name, COLUMNS, n=1, cutoff=0.75)
            if close and close[0] not in [n.strip().lower() for n in names]:
                raise _problem(path, line, f"unknown column {raw.strip()!r}; did you mean {close[0]!r}?")
    missing = [name for name in REQUIRED if name not in found]
    if missing:
        shown = ",".join(n.strip() for n in names)
        raise _problem(path, line, f"no column {missing[0]!r} (the header must name fixed, moving and out, "
                       f"optionally moving_labels; it reads {shown!r})")
    return {**found, "width": len(names)}


def read_pairs(path):
    """The pairs of a pairs file, in file order.

    Args:
      path: the CSV file.

    Returns:
      A list of dicts ``{"fixed", "moving", "out": str, "moving_labels": [str, ...],
      "fixed_labels": [str, ...], "line": physical line number (1-based), "index": pair index
      (0-based)}``; paths
      resolved against the file's folder.

    Raises:
      InputError: one line naming the file, the line and the problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"pairs file {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"pairs file {path} is a folder; a CSV file is required")
    with open(path, "rb") as stream:
        text = _decode(path, stream.read())
    folder = os.path.dirname(os.path.abspath(path))
    lines = _content_lines(text)
    header_line, separator = _header(path, lines)
    reader = csv.reader(lines[header_line - 1:], delimiter=separator, skipinitialspace=True, strict=True)
    try:
        columns = _columns(path, header_line, next(reader))
        rows = []
        for cells in reader:
            line = header_line + reader.line_num - 1
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, a comment line or a row of empty cells
            rows.append(_row(path, line, cells, columns, folder, len(rows)))
    except csv.Error as error:
        raise _problem(path, header_line + reader.line_num - 1, f"not valid CSV ({error})") from None
    if not rows:
        raise InputError(f"pairs file {path} holds no pairs (a header and no rows)")
    return rows


def _row(path, line, cells, columns, folder, index):
    width = columns["width"]
    if any(cell.strip() for cell in cells[width:]):
        raise _problem(path, line, f"{len(cells)} cells, but the header has {width} (quote a path holding "
                       "the separator: \"a,b.nii.gz\")")

    def cell(name):
        index_of = columns.get(name)
        return cells[index_of].strip() if index_of is not None and index_of < len(cells) else ""

    def resolve(value):
        value = os.path.expanduser(value)
        return os.path.normpath(value if os.path.isabs(value) else os.path.join(folder, value))

    values = {}
    for name in REQUIRED:
        values[name] = cell(name)
        if not values[name]:
            raise _problem(path, line, f"the {name!r} cell is empty")
    def paths(name):
        return [resolve(v.strip()) for v in cell(name).split(";") if v.strip()]

    return {"fixed": resolve(values["fixed"]), "moving": resolve(values["moving"]), "out": resolve(values["out"]),
            "moving_labels": paths("moving_labels"), "fixed_labels": paths("fixed_labels"), "line": line,
            "index": index}


def shared_outputs(rows):
    """``{line: earlier line}`` for each row whose output folder an earlier row already names."""
    first, shared = {}, {}
    for row in rows:
        key = os.path.normcase(os.path.abspath(row["out"]))
        if key in first:
            shared[row["line"]] = first[key]
        else:
            first[key] = row["line"]
    return shared


def parse_shard(text):
    """``(K, N)`` from ``"K/N"`` with ``0 <= K < N`` (a Slurm array index or a Kubernetes
    completion index over N tasks); InputError otherwise."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise InputError(f"--shard takes K/N, e.g. 0/4 (the first of 4 parts); got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise InputError(f"--shard K/N needs 0 <= K < N (K counts from 0, as Slurm array and Kubernetes "
                         f"completion indices do); got {text!r}")
    return k, n


def shard(rows, k, n):
    """The rows of shard ``k`` of ``n``: pair index ``k`` modulo ``n`` (see the module doc)."""
    return [row for row in rows if row["index"] % n == k]
