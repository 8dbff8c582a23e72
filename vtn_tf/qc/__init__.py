"""Quality control of registrations: figures, a picture, a failure rule, cohort reports, plots.

* `vtn_tf.qc.figures`: the figures of one registration (``qc.json``) from numpy arrays;
* `vtn_tf.qc.flags`: the documented rule that marks a registration as suspect, with reasons;
* `vtn_tf.qc.picture`: the picture of one registration (``qc.png``);
* `vtn_tf.qc.report`: the cohort report of a batch (``report.html``, ``report.csv``);
* `vtn_tf.qc.plots`: Dice box plots of an evaluation's rows.

:func:`check` runs the first three on one registration. The drawing needs matplotlib (the
``plot`` extra), imported only when a picture is drawn. Importing this package does nothing
but define things.
"""

import concurrent.futures
import dataclasses
import json
import time

from vtn_tf.qc import figures as figures_lib
from vtn_tf.qc import flags as flags_lib

FILES = ("qc.png", "qc.json")


@dataclasses.dataclass
class Check:
    """One registration's quality control: ``figures`` (dict), ``flags`` (list of
    ``{"flag", "reason"}``), ``picture`` (PNG bytes, or None) and ``seconds`` (what it cost)."""

    figures: dict
    flags: list
    picture: bytes | None = None
    seconds: float = 0.0

    @property
    def suspect(self):
        return bool(self.flags)

    def to_json(self):
        return {"suspect": self.suspect, "flags": self.flags, **self.figures,
                "thresholds": dataclasses.asdict(flags_lib.THRESHOLDS), "qc_seconds": round(self.seconds, 3)}

    def json_text(self):
        return json.dumps(self.to_json(), indent=2) + "\n"

    def summary(self):
        """Two lines for the console: the verdict and the figures."""
        from vtn_tf.qc import picture

        verdict = ("SUSPECT: " + "; ".join(f["reason"] for f in self.flags)) if self.flags else "no failure flag"
        return f"qc: {verdict}\nqc: {picture.summary_line(self.figures)}"


def check(fixed, moving_headers, warped, flow, fixed_affine, world_ras=None, *, picture=True, name="",
          fixed_labels=(), warped_labels=(), headers_labels=(), thresholds=flags_lib.THRESHOLDS, mask=None,
          **figure_options):
    """Figures, flags and (``picture``) the PNG of one registration.

    Arguments as :func:`vtn_tf.qc.figures.compute` (arrays on the fixed grid; ``flow`` in
    voxels of the fixed grid, pulling); ``fixed_labels`` / ``warped_labels``: label maps on the
    fixed grid (Dice when both are given; the first warped map is outlined in the picture);
    ``headers_labels``: the moving label maps placed by the headers alone (Dice before);
    ``mask``: the fixed image's foreground (`vtn_tf.qc.figures.foreground`) when already computed.
    Returns a :class:`Check`.
    """
    import io

    begin = time.perf_counter()
    mask = figures_lib.foreground(fixed) if mask is None else mask
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        composed = None
        if picture:  # the panels need no figure: drawn beside them (numpy and Pillow let go of the lock)
            from vtn_tf.qc import picture as picture_lib

            composed = pool.submit(picture_lib.compose, fixed, moving_headers, warped, flow, fixed_affine,
                                   warped_labels[0] if len(warped_labels) else None,
                                   fixed_labels[0] if len(fixed_labels) else None, mask)
        figures = figures_lib.compute(fixed, moving_headers, warped, flow, fixed_affine, world_ras, mask=mask,
                                      fixed_labels=fixed_labels, warped_labels=warped_labels,
                                      headers_labels=headers_labels, **figure_options)
        found = flags_lib.flags(figures, thresholds)
        png = None
        if composed is not None:
            buffer = io.BytesIO()
            picture_lib.finish(composed.result(), buffer, figures, found, name)
            png = buffer.getvalue()
    return Check(figures, found, png, time.perf_counter() - begin)


def write(folder, result):
    """Write ``qc.json`` (and ``qc.png`` when drawn) of a :class:`Check` into ``folder``;
    returns the names written."""
    import pathlib

    folder = pathlib.Path(folder)
    (folder / "qc.json").write_text(result.json_text())
    names = ["qc.json"]
    if result.picture is not None:
        (folder / "qc.png").write_bytes(result.picture)
        names.insert(0, "qc.png")
    return names
