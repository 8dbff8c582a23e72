"""The cohort report of a batch of registrations: ``report.html`` and ``report.csv``.

One row per pair: its verdict (suspect or not), the reasons, the figures of its ``qc.json``
and, in the HTML, a thumbnail of its ``qc.png``. Suspects come first, then the rest by rising
local correlation after registration. The HTML is one self-contained file: the thumbnails are
inline base64 PNGs and the table sorts by any column (click its header) with a few lines of
inline JavaScript; it loads nothing from the network. The CSV holds the same columns (the
thumbnail as the path of ``qc.png``).
"""

import base64
import csv
import html
import io as text_io
import json
import math
import os

from vtn_tf.qc import flags as flags_lib

COLUMNS = (  # (column, where in qc.json, format)
    ("lcc_before", ("similarity", "before", "lcc"), "{:.3f}"),
    ("lcc_after", ("similarity", "after", "lcc"), "{:.3f}"),
    ("cc_before", ("similarity", "before", "cc"), "{:.3f}"),
    ("cc_after", ("similarity", "after", "cc"), "{:.3f}"),
    ("folding_percent", ("field", "folding_percent"), "{:.3f}"),
    ("jacobian_std", ("field", "jacobian_std"), "{:.3f}"),
    ("largest_displacement_mm", ("field", "largest_displacement_mm"), "{:.1f}"),
    ("rotation_degrees", ("affine", "rotation_angle_degrees"), "{:.1f}"),
    ("scale_x", ("affine", "scales", 0), "{:.3f}"),
    ("scale_y", ("affine", "scales", 1), "{:.3f}"),
    ("scale_z", ("affine", "scales", 2), "{:.3f}"),
    ("moving_inside_percent", ("coverage", "moving_inside_percent"), "{:.0f}"),
    ("dice_before", ("dice", "before"), "{:.3f}"),
    ("dice", ("dice", "mean"), "{:.3f}"),
    ("inverse_rms_mm", ("inverse_consistency", "rms_mm"), "{:.2f}"),
    ("seconds", ("seconds", "total"), "{:.2f}"),
)
HEAD = ("pair", "status", "reasons")
THUMBNAIL_WIDTH = 320  # pixels


def _lookup(values, path):
    for key in path:
        try:
            values = values[key]
        except (KeyError, IndexError, TypeError):
            return math.nan
    return math.nan if values is None else float(values)


def entry(name, folder=None, error=None):
    """A report entry for a pair registered into ``folder`` (its ``qc.json`` and ``qc.png``, when
    there), or one that failed with ``error`` (a line of text)."""
    qc, picture = None, None
    if folder is not None and error is None:
        try:
            with open(os.path.join(os.fspath(folder), "qc.json"), encoding="utf-8") as stream:
                qc = json.load(stream)
        except (OSError, ValueError):
            qc = None
        png = os.path.join(os.fspath(folder), "qc.png")
        picture = png if os.path.isfile(png) else None
    return {"name": name, "qc": qc, "picture": picture, "error": error}


def rows(entries, thresholds=flags_lib.THRESHOLDS):
    """Report rows from ``entries``: dicts with ``name``, ``qc`` (a ``qc.json`` dict, or None for
    a failed pair), optional ``picture`` (path of ``qc.png``) and ``error`` (why a pair failed).

    Adds the cohort flag (:func:`vtn_tf.qc.flags.cohort_flags`) to each pair's own flags, and
    orders them: failed pairs and suspects first, then by rising local correlation after.
    """
    out = []
    for entry in entries:
        qc = entry.get("qc") or {}
        reasons = [f["reason"] for f in qc.get("flags", [])]
        row = {"pair": entry["name"], "picture": entry.get("picture") or "", "reasons": reasons,
               "error": entry.get("error")}
        for name, path, _ in COLUMNS:
            row[name] = _lookup(qc, path)
        out.append(row)
    cohort = zip(flags_lib.cohort_flags([row["lcc_after"] for row in out], thresholds),
                 flags_lib.cohort_flags([row["dice"] for row in out], thresholds, "the mean Dice"))
    for row, extra in zip(out, cohort):
        row["reasons"] += [flag["reason"] for flag in extra if flag]
        row["status"] = "failed" if row["error"] else ("suspect" if row["reasons"] else "ok")
        if row["error"]:
            row["reasons"] = [row["error"]]
    order = {"failed": 0, "suspect": 1, "ok": 2}
    return sorted(out, key=lambda r: (order[r["status"]], r["lcc_after"] if math.isfinite(r["lcc_after"]) else -2))


def _text(row, name, form=None):
    if name == "reasons":
        return "; ".join(row["reasons"])
    value = row[name]
    if isinstance(value, float):
        return "" if not math.isfinite(value) else form.format(value)
    return str(value)


def csv_text(report_rows):
    """The rows as CSV text (the same columns as the HTML; ``qc_png``: the picture's path)."""
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(HEAD) + [name for name, _, _ in COLUMNS] + ["qc_png"])
    for row in report_rows:
        writer.writerow([_text(row, "pair"), row["status"], _text(row, "reasons")]
                        + [_text(row, name, form) for name, _, form in COLUMNS] + [row["picture"]])
    return buffer.getvalue()


def thumbnail(path, width=THUMBNAIL_WIDTH):
    """A ``data:`` URI of ``path`` (a PNG) scaled to ``width`` pixels, or "" when unreadable."""
    try:
        from PIL import Image  # matplotlib's own dependency (the plot extra)

        with Image.open(path) as image:
            height = max(1, round(image.height * width / image.width))
            small = image.convert("RGB").resize((width, height), Image.LANCZOS)
            buffer = text_io.BytesIO()
            small.save(buffer, format="PNG", optimize=True)
    except (OSError, ValueError):
        return ""
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0];
  const k = Array.prototype.indexOf.call(th.parentNode.children, th);
  const up = th.dataset.dir !== 'up';
  for (const h of th.parentNode.children) { h.dataset.dir = ''; }
  th.dataset.dir = up ? 'up' : 'down';
  const key = r => { const c = r.children[k]; return c.dataset.v !== undefined ? c.dataset.v : c.textContent; };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny
      : (isNaN(nx) !== isNaN(ny) ? (isNaN(nx) ? 1 : -1) : x.localeCompare(y));
    return up ? d : -d;
  });
  for (const r of rows) { body.appendChild(r); }
}
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; }
th { background: #eee; cursor: pointer; position: sticky; top: 0; max-width: 7em; }
th[data-dir="up"]::after { content: " \\25B2"; } th[data-dir="down"]::after { content: " \\25BC"; }
tr.suspect td.status, tr.failed td.status { color: #fff; background: #b22; font-weight: bold; }
tr.ok td.status { color: #fff; background: #282; }
td.reasons { min-width: 18em; max-width: 28em; }
td.pair { min-width: 9em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { display: block; }
"""


def html_text(report_rows, title="Registration report", note=""):
    """The self-contained HTML page of the rows."""
    suspects = sum(row["status"] != "ok" for row in report_rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("status", "pair", "picture", "reasons"))
    head += "".join(f"<th>{html.escape(name).replace('_', '_<wbr>')}</th>" for name, _, _ in COLUMNS)
    body = []
    for row in report_rows:
        rank = {"failed": 0, "suspect": 1, "ok": 2}[row["status"]]
        image = thumbnail(row["picture"]) if row["picture"] else ""
        cells = [f'<td class="status" data-v="{rank}">{row["status"]}</td>',
                 f'<td class="pair">{html.escape(row["pair"])}</td>',
                 f'<td><a href="{html.escape(row["picture"])}"><img src="{image}" width="{THUMBNAIL_WIDTH}" '
                 f'alt="qc.png of {html.escape(row["pair"])}"></a></td>' if image else "<td></td>",
                 f'<td class="reasons">{html.escape(_text(row, "reasons"))}</td>']
        for name, _, form in COLUMNS:
            value = row[name]
            key = f"{value:.6g}" if math.isfinite(value) else ""
            cells.append(f'<td class="num" data-v="{key}">{html.escape(_text(row, name, form))}</td>')
        body.append(f'<tr class="{row["status"]}">' + "".join(cells) + "</tr>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>{len(report_rows)} pairs, <b>{suspects} suspect or failed</b> "
            "(listed first). Click a column header to sort; click a picture to open it. lcc: local "
            "correlation with the fixed image in 5³ windows, before (headers alone) and after registration; "
            "cc: the global correlation. The failure rule and its thresholds: docs/qc.md."
            f"{(' ' + html.escape(note)) if note else ''}</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
            "<script>for (const th of document.querySelectorAll('th')) { th.onclick = () => sortBy(th); }</script>\n"
            "</body></html>\n")


def write(folder, entries, title="Registration report", note=""):
    """Write ``report.html`` and ``report.csv`` into ``folder`` (atomically, each through a
    temporary file renamed into place); returns their paths."""
    report_rows = rows(entries)
    paths = []
    for name, text in (("report.csv", csv_text(report_rows)), ("report.html", html_text(report_rows, title, note))):
        path = os.path.join(os.fspath(folder), name)
        temporary = path + ".partial"
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
        paths.append(path)
    return paths
