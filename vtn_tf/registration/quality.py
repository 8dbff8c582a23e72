"""The quality check of one registration (`vtn_tf.qc`) from what the pipeline computed.

:func:`quality_check` places the moving image (and, with fixed labels, its label maps) in
the fixed space by the headers alone, the "before" of the figures; measures the inverse
consistency when the inverse was computed; and hands everything to :func:`vtn_tf.qc.check`.
The files it makes (``qc.png``, ``qc.json``) are written with the other outputs, in the same
staging folder (`vtn_tf.registration.outputs.write_result`).
"""

import os
import time

import numpy as np

from vtn_tf import qc
from vtn_tf.qc import figures as qc_figures
from vtn_tf.registration.inverse import inverse_consistency
from vtn_tf.registration.resampling import resample_through

MODALITIES = {"mri": "MRI", "ct": "CT", "none": None}


def modality_of(contract, intensity="auto"):
    """The modality a model expects: the ``intensity`` override, else its contract's."""
    if intensity != "auto":
        return MODALITIES[intensity]
    return getattr(contract, "modality", None)


def quality_check(result, fixed, moving, moving_labels=(), fixed_labels=(), modality=None, picture=True, name=None):
    """A :class:`vtn_tf.qc.Check` of a registration :class:`~vtn_tf.registration.pipeline.Result`.

    Args:
      result: the registration (``flow_voxels``, ``warped``, ``warped_labels``, ``affine``,
        ``seconds``, optional ``inverse``).
      fixed, moving: the :class:`vtn_tf.io.Volume` pair; moving_labels: its label volumes.
      fixed_labels: label volumes on the fixed grid, paired in order with the moving ones (Dice
        after, and before with the headers alone).
      modality: what the model expects (:func:`modality_of`) for the intensity check.
    Returns:
      the check; its ``seconds`` include placing the moving image by the headers.
    """
    begin = time.perf_counter()
    shape = fixed.data.shape
    fixed_to_moving = np.linalg.inv(moving.affine) @ fixed.affine
    headers = resample_through(moving.data, fixed_to_moving, shape, "linear", "zero")
    paired = min(len(fixed_labels), len(result.warped_labels))
    headers_labels = [resample_through(v.data, fixed_to_moving, shape, "nearest", "zero")
                      for v in list(moving_labels)[:paired]]
    mask = qc_figures.foreground(fixed.data)  # once, for the figures, the picture and the inverse's consistency
    consistency = None
    if result.inverse is not None:
        consistency = inverse_consistency(result.flow_voxels, result.inverse.flow, fixed.affine, moving.affine, mask)
    if name is None:
        name = f"{os.path.basename(fixed.path)} <- {os.path.basename(moving.path)}"
    seconds = dict(result.seconds)
    seconds["total"] = sum(seconds.values())
    check = qc.check(fixed.data, headers, result.warped, result.flow_voxels, fixed.affine,
                     np.asarray(result.affine["world_ras"]), picture=picture, name=name,
                     fixed_labels=[v.data for v in list(fixed_labels)[:paired]],
                     warped_labels=list(result.warped_labels), headers_labels=headers_labels,
                     inverse_consistency=consistency, seconds=seconds, modality=modality, moving=moving.data,
                     moving_affine=moving.affine, mask=mask)
    check.seconds = time.perf_counter() - begin
    return check
