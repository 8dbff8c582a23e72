"""Register new image files in world space with a trained VTN run directory.

`register_files(run_dir, fixed, moving, out)` (the library of ``vtn-register``) reads two
3-D volumes of any size, spacing and orientation, prepares them as the model's training
volumes were prepared (its :class:`vtn_tf.preparation.InputContract`), aligns them in world
space, runs the network on its grid and writes the result in the **fixed image's world
space, on the fixed image's grid, with its affine**. Every resampling runs in TensorFlow
with the project's compiled sampler (`vtn_tf.sampling.sample`), float32, in slabs of the
fixed grid so memory stays bounded.

Grids and maps (all affines map voxel indices to RAS mm, as in `vtn_tf.io`):

* ``F``: the fixed image's grid, affine ``A_f``. ``M``: the moving image's grid, ``A_m``.
* ``G``: network index -> fixed index, the contract's crop box of the fixed image resampled
  onto the network grid ``N`` (`vtn_tf.preparation.grid_map`; the whole image without a
  crop). The fixed image is sampled at ``G n`` (trilinear, edge-clamped) and normalised
  exactly as the training volumes were.
* ``T``: the initial alignment (`vtn_tf.preprocessing.alignment`), world fixed point -> world moving
  point. The moving image, normalised on its own crop box, is sampled at moving index
  ``A_m^-1 T A_f G n`` (0 outside it).
* The network's flow ``f_N`` (voxels of ``N``, pulling) is brought onto the fixed grid at
  ``G^-1 x`` (trilinear, edge-clamped), scaled by ``G``'s voxel ratio, and composed with
  ``T``: the fixed voxel ``x`` corresponds to the world point ``T A_f (x + S f_N(G^-1 x))``.
* With ``refine`` the field is then optimised on the pair (`vtn_tf.registration.refinement`).

Outputs (``out/``; ``.nii`` instead of ``.nii.gz`` with ``compression=0``):

* ``flow_voxels.nii.gz``: float32 ``[X, Y, Z, 3]`` (Learn2Reg layout), displacement **in
  voxels of the fixed grid**, pulling, channel c along array axis c, the initial alignment
  included: fixed voxel ``x`` corresponds to the world point ``A_f (x + u(x))``, i.e. to
  moving voxel ``A_m^-1 A_f (x + u(x))``. When both images share one grid this is the usual
  Learn2Reg meaning ``moving_voxel = x + u(x)``.
* ``flow_itk.nii.gz``: float32 ``[X, Y, Z, 1, 3]`` NIfTI, intent 1007 (vector), the fixed
  affine; vectors in physical **LPS millimetres** ``d(p)`` so that a fixed point ``p`` maps
  to the moving point ``p + d(p)`` (ITK/ANTs displacement field: ``antsApplyTransforms -t``,
  ``sitk.DisplacementFieldTransform``). ``d = diag(-1, -1, 1) A_f[:3, :3] u``.
* ``warped.nii.gz``: float32, the moving image in its original intensities resampled at
  ``A_m^-1 A_f (x + u(x))`` (trilinear; 0 beyond half a voxel outside the moving volume).
* ``warped_labels_<name>.nii.gz``: each moving label map, same positions, nearest neighbour
  (half up, as ITK), ids unchanged, integer dtype of the input file (int32 if it stored floats).
* ``affine.json`` / ``affine.txt``: the affine part: the initial alignment composed with the
  network's affine stage (models without one: the initial alignment alone). JSON: ``A``
  (3x3) and ``b`` (voxels) of the affine stage on centred network coordinates
  ``c = n - (N_size - 1) / 2`` (sampled position ``A c + b``), the network grid and its
  affine, ``initial_alignment_ras`` (``T``) and ``world_ras`` / ``world_lps``, the 4x4 maps
  taking a fixed-image point (mm) to the corresponding moving-image point (pull direction,
  like the fields). The text file is the same LPS map as an ITK transform file
  (``AffineTransform_double_3_3``), readable by ``sitk.ReadTransform`` and
  ``antsApplyTransforms``.

Every input is read and checked, the model restored and all results computed before the
first file is written; the files are written into a temporary folder beside ``out`` and
moved there together, so an error leaves nothing behind, and existing outputs are refused
unless ``overwrite``.
"""

import contextlib
import copy
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from vtn_tf import io
from vtn_tf.core import geometry
from vtn_tf.io.volumes import PathLike
from vtn_tf.preprocessing import preparation
from vtn_tf.registration import finetune, kernels, refinement
from vtn_tf.registration.inputs import network_inputs
from vtn_tf.registration.inverse import invert
from vtn_tf.registration.network import (
    default_contract,
    load_contract,
    load_model,
    network_outputs,
)
from vtn_tf.registration.outputs import affine_description, check_outputs, write_result
from vtn_tf.registration.quality import modality_of, quality_check
from vtn_tf.registration.resampling import (
    displacement_lengths,
    network_flow_on_fixed,
    normalised,
    resample_through,
)
from vtn_tf.registration.settings import RegistrationSettings


@dataclasses.dataclass
class Result:
    """Everything `register_volumes` computed, on the fixed grid (see the module doc).

    ``flow_voxels``: ``[X, Y, Z, 3]`` float32 numpy; ``warped``: ``[X, Y, Z]`` float32;
    ``warped_labels``: list of ``[X, Y, Z]`` integer arrays; ``affine``: dict
    (:func:`affine_description`); ``network_flow``: ``[Xn, Yn, Zn, 3]`` network voxels;
    ``seconds``: wall clock per part (``preprocess``, ``fine-tune`` with
    ``network.finetune_steps``, ``network``, ``field``, ``refine``, ``resample``).
    """

    flow_voxels: np.ndarray
    warped: np.ndarray
    warped_labels: list
    affine: dict | None
    network_flow: np.ndarray
    seconds: dict = dataclasses.field(default_factory=dict)
    refine_log: list = dataclasses.field(default_factory=list)
    inverse: object = None  # Inverse or None
    quality: Any = None  # vtn_tf.qc.Check or None



def network_field(model, network_shape, fixed_net, moving_net, network, log=print):
    """The network's outputs on the network grid (``flow`` ``[1, X, Y, Z, 3]``, network voxels,
    pulling; ``affine_*`` for an affine stage) and the seconds of each part, with ``network``
    (:class:`~vtn_tf.registration.settings.NetworkSettings`): fine-tuned first if it says so,
    a zero field without running the network for ``passes`` 0."""
    seconds, begin = {}, time.perf_counter()
    inputs = (fixed_net[None, ..., None], moving_net[None, ..., None])
    with contextlib.ExitStack() as weights:
        if network.finetune_steps:
            weights.enter_context(finetune.finetuned(model, *inputs, network.finetune_steps, network.finetune_rate,
                                                     log))
            seconds["fine-tune"] = time.perf_counter() - begin
            begin = time.perf_counter()
        if network.passes == 0:  # the optimiser without the network: the initial alignment alone
            out = {"flow": np.zeros((1, *network_shape, 3), np.float32)}
        else:
            out = dict(network_outputs(model, *inputs, network.passes))
        out["flow"] = np.asarray(out["flow"])
    seconds["network"] = time.perf_counter() - begin
    return out, seconds


def contract_for(contract, network_shape, intensity):
    """The input contract a registration uses: the model's (None: :func:`default_contract`), its
    normalisation replaced unless ``intensity`` is ``auto``; InputError when its grid is not the
    network's."""
    contract = contract or default_contract(network_shape, "mri" if intensity == "auto" else intensity)
    if intensity != "auto":
        contract = dataclasses.replace(contract, modality=default_contract(network_shape, intensity).modality)
    if tuple(contract.grid) != tuple(network_shape):
        raise io.InputError(f"the input contract's grid {_shape(contract.grid)} is not the model's "
                            f"{_shape(network_shape)}")
    return contract


@kernels.quiet_retracing
def register_volumes(model: Any, network_shape: tuple[int, int, int], fixed: io.Volume, moving: io.Volume,
                     moving_labels: Sequence[io.Volume] = (), settings: RegistrationSettings | None = None,
                     contract: preparation.InputContract | None = None,
                     log: Callable[[str], Any] = print) -> "Result":
    """Register ``moving`` to ``fixed`` (both :class:`vtn_tf.io.Volume`) with ``model``.

    Args:
      model: a VTN, or any callable taking ``{"fixed", "moving"}`` ``[1, X, Y, Z, 1]`` on the
        network grid and returning a dict with ``flow`` (``[1, X, Y, Z, 3]``, network voxels,
        pulling) and, for an affine stage, ``affine_matrix`` / ``affine_translation``.
      network_shape: ``(X, Y, Z)`` of the network grid.
      moving_labels: :class:`vtn_tf.io.Volume` label maps on the moving grid.
      settings: :class:`~vtn_tf.registration.settings.RegistrationSettings` (None: the
        defaults): the initial alignment, the network pass (``passes`` > 1 needs a VTN; 0 does
        not run the network: the initial alignment and the refinement alone), the refinement.
      contract: the model's :class:`vtn_tf.preprocessing.preparation.InputContract`; None:
        :func:`~vtn_tf.registration.network.default_contract`.
    Returns:
      :class:`Result`.
    """
    settings = settings or RegistrationSettings()
    begin = time.perf_counter()
    contract = contract_for(contract, network_shape, settings.network.intensity)
    fixed_net, moving_net, G, T, fixed_map, moving_norm = network_inputs(
        contract, fixed, moving, settings.alignment.init, log, settings.alignment.steps)
    box = np.asarray(fixed.spacing) * np.diag(G)[:3] * network_shape
    log(f"network grid {_shape(network_shape)} over a {_mm(box)} mm "
        f"box of the fixed image ({contract.crop} crop, {contract.modality} intensities"
        f"{', histogram matched' if contract.reference_quantiles is not None else ''})")
    seconds = {"preprocess": time.perf_counter() - begin}
    out, network_seconds = network_field(model, network_shape, fixed_net, moving_net, settings.network, log)
    seconds.update(network_seconds)
    network_flow = out["flow"][0]

    begin = time.perf_counter()
    K = np.linalg.inv(fixed.affine) @ T @ fixed.affine
    flow = network_flow_on_fixed(network_flow, G, fixed.data.shape, K)
    seconds["field"] = time.perf_counter() - begin
    refine_log = []
    if settings.refine.active:
        begin = time.perf_counter()
        levels = settings.refine.resolved(np.linalg.norm(G[:3, :3], axis=0))
        flow, refine_log = refinement.refine_field(normalised(fixed.data, fixed_map), fixed.affine, moving_norm,
                                                   moving.affine, flow, levels, log, alignment=K)
        seconds["refine"] = time.perf_counter() - begin

    begin = time.perf_counter()
    warped, labels, flow = resample_moving(fixed, moving, moving_labels, flow, log)
    seconds["resample"] = time.perf_counter() - begin
    matrix = out.get("affine_matrix")
    A = np.asarray(matrix)[0] if matrix is not None else np.eye(3)
    b = np.asarray(out["affine_translation"])[0] if matrix is not None else np.zeros(3)
    affine = affine_description(A, b, network_shape, G, fixed.affine, T)
    return Result(flow, warped, labels, affine, network_flow, seconds, refine_log)


def resample_moving(fixed, moving, moving_labels, flow, log=print):
    """The moving image (trilinear) and label maps (nearest) on the fixed grid through ``flow``
    (fixed voxels, pulling), and the field as numpy."""
    fixed_to_moving = geometry.voxel_map(fixed.affine, moving.affine)
    shape = fixed.data.shape
    warped = resample_through(moving.data, fixed_to_moving, shape, "linear", "zero", flow)
    labels = [resample_through(v.data, fixed_to_moving, shape, "nearest", "zero", flow) for v in moving_labels]
    mean, largest = displacement_lengths(flow, fixed.spacing)
    log(f"displacement on the fixed grid: mean {mean:.2f} mm, max {largest:.2f} mm")
    flow = flow.numpy() if hasattr(flow, "numpy") else np.asarray(flow, np.float32)
    return warped, labels, flow


def _shape(shape):
    return "x".join(str(int(n)) for n in shape)


def _mm(values):
    return "x".join(f"{float(v):.3g}" for v in values)


def read_inputs(fixed_path: PathLike, moving_path: PathLike,
                label_paths: Sequence[PathLike] = ()) -> tuple[io.Volume, io.Volume, list[io.Volume]]:
    """Read and check the images (3-D, finite, not constant) and the moving label maps."""
    fixed = io.read_volume(fixed_path, "fixed image")
    io.check_not_constant(fixed, "fixed image")
    moving = io.read_volume(moving_path, "moving image")
    io.check_not_constant(moving, "moving image")
    labels = [io.read_labels(p, reference=moving, role="moving labels") for p in label_paths]
    return fixed, moving, labels


def describe(role, volume):
    orientation = "".join(nib.aff2axcodes(volume.affine))
    return (f"{role} {os.path.basename(volume.path)}: {_shape(volume.data.shape)} voxels of "
            f"{_mm(volume.spacing)} mm, {orientation} orientation, {volume.data.dtype}")


@dataclasses.dataclass
class Registrar:
    """A model loaded once, registering any number of pairs (``vtn-register``, batch mode).

    Args:
      run_dir: a vtn-train run directory.
      settings: :class:`~vtn_tf.registration.settings.RegistrationSettings` (None: the defaults).
      log: receives the progress lines.
    """

    run_dir: str
    settings: RegistrationSettings = dataclasses.field(default_factory=RegistrationSettings)
    log: Callable[[str], Any] = print

    def __post_init__(self) -> None:
        network = self.settings.network
        self.model, self.network_shape, self.checkpoint = load_model(os.fspath(self.run_dir), network.precision)
        has_record = any((pathlib.Path(self.run_dir) / name).is_file()
                         for name in ("preprocessing.json", "config.json"))
        if has_record:
            self.contract = load_contract(self.run_dir)
        else:
            self.contract = None
            self.log(f"model {self.run_dir} records no input contract: each image is scaled on its own "
                     "over its whole field of view")
        notes = ([f"network in {network.precision}"] if network.precision != "float32" else []) \
            + ([f"{network.passes} test-time passes"] if network.passes > 1 else []) \
            + (["the network is not run (passes 0): initial alignment and refinement alone"]
               if network.passes == 0 else [])
        self.log(f"model {self.run_dir} ({self.checkpoint}), spec {getattr(self.model, 'spec', '?')}, grid "
                 f"{_shape(self.network_shape)}" + "".join(f"; {note}" for note in notes))

    def with_settings(self, settings: RegistrationSettings, log: Callable[[str], Any] | None = None) -> "Registrar":
        """This registrar with other ``settings`` (and ``log``), sharing its loaded model: the
        network's precision must be the same (the model is built in it)."""
        if settings.network.precision != self.settings.network.precision:
            raise ValueError(f"the model is loaded in {self.settings.network.precision}, "
                             f"not {settings.network.precision}")
        twin = copy.copy(self)
        twin.settings, twin.log = settings, log or self.log
        return twin

    def register(self, fixed: io.Volume, moving: io.Volume, labels: Sequence[io.Volume] = ()) -> "Result":
        return register_volumes(self.model, self.network_shape, fixed, moving, labels, self.settings, self.contract,
                                self.log)

    def register_files(self, fixed_path: PathLike, moving_path: PathLike, out: PathLike,
                       moving_labels: Sequence[PathLike] = (), overwrite: bool = False,
                       fixed_labels: Sequence[PathLike] = (), inputs=None) -> tuple[list[str], "Result", dict]:
        """Read, register and write one pair; returns ``(written paths, Result, seconds per part)``.

        ``inputs``: the pair as :func:`read_inputs` already read it from these paths (not read again)."""
        label_paths = [os.fspath(p) for p in moving_labels]
        fixed_label_paths = [os.fspath(p) for p in fixed_labels]
        output = self.settings.output
        check_outputs(out, label_paths, overwrite, output.compression, output.inverse, fixed_label_paths, output.qc)
        begin = time.perf_counter()
        fixed, moving, labels = inputs or read_inputs(fixed_path, moving_path, label_paths)
        fixed_label_volumes = [io.read_labels(p, reference=fixed, role="fixed labels") for p in fixed_label_paths]
        read_seconds = time.perf_counter() - begin
        self.log(describe("fixed", fixed))
        self.log(describe("moving", moving))
        result = self.register(fixed, moving, labels)
        if output.inverse:
            invert(result, fixed, moving, fixed_label_volumes, self.log)
        if output.qc:
            result.quality = quality_check(result, fixed, moving, labels, fixed_label_volumes,
                                           modality_of(self.contract, self.settings.network.intensity))
            self.log(result.quality.summary())
        begin = time.perf_counter()
        written = write_result(result, fixed, label_paths, labels, out, overwrite, self.log, output.compression,
                               moving, fixed_label_paths, fixed_label_volumes, self.settings, result.quality)
        parts = {"read": read_seconds, **result.seconds, **({"qc": result.quality.seconds} if output.qc else {}),
                 "write": time.perf_counter() - begin}
        return written, result, parts


def register_files(run_dir: PathLike, fixed_path: PathLike, moving_path: PathLike, out: PathLike,
                   moving_labels: Sequence[PathLike] = (), fixed_labels: Sequence[PathLike] = (),
                   settings: RegistrationSettings | None = None, overwrite: bool = False,
                   log: Callable[[str], Any] = print) -> list[str]:
    """Register two files with a run directory's model and write the outputs into ``out``.

    See the module docstring for the grids and the exact meaning of every output; ``settings``:
    :class:`~vtn_tf.registration.settings.RegistrationSettings` (None: the defaults; a preset:
    `vtn_tf.registration.settings.resolve`). Returns the list of written paths. Raises
    :class:`vtn_tf.io.InputError` (before writing anything) for unreadable, non-3-D, NaN or
    constant images, labels off the moving grid, a missing or corrupt model, or existing
    outputs without ``overwrite``.
    """
    settings = settings or RegistrationSettings()
    label_paths = [os.fspath(p) for p in moving_labels]
    check_outputs(out, label_paths, overwrite, settings.output.compression, settings.output.inverse,
                  [os.fspath(p) for p in fixed_labels], settings.output.qc)
    inputs = read_inputs(fixed_path, moving_path, label_paths)  # refuse bad files before loading a model
    registrar = Registrar(os.fspath(run_dir), settings, log)
    return registrar.register_files(fixed_path, moving_path, out, label_paths, overwrite, fixed_labels, inputs)[0]
