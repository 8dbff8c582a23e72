"""Classical registration baselines for evaluation: ANTs SyN and elastix (affine + B-spline).

Both run on the prepared volumes (numpy ``[X, Y, Z]`` arrays on one grid, with the prepared
voxel spacing, origin 0 and identity direction), each with its stock parameters:

* ``ants``: ``ants.registration(fixed, moving, type_of_transform="SyN")`` (antspyx), labels
  carried with ``ants.apply_transforms(..., interpolator="nearestNeighbor")``.
* ``elastix``: the default ``"affine"`` then ``"bspline"`` parameter maps (itk-elastix), labels
  carried by transformix with nearest-neighbour resampling (B-spline order 0).

Both also return their displacement field as a flow ``[X, Y, Z, 3]`` float32 in voxels of the
fixed grid, pulling (``moved(x) = moving(x + flow(x))``, channel c along array axis c), the
convention of :mod:`vtn_tf.core`, so that the same Jacobian, folding and landmark metrics
apply. Both tools are optional (``pip install .[baselines]``); :func:`unavailable` says why one
cannot run instead of failing at import.

ANTs SyN with its defaults samples 20 % of the voxels at random for the affine stage, so two
runs on one pair differ slightly (Dice by about 0.01 on hippocampus pairs); elastix's default
maps also sample at random, from a fixed seed.

Threads: ITK (and so both tools) is limited to ``THREADS`` threads, set before the first import.
Timing covers the registration call only (not the label resampling or the field export).
"""

import os
import tempfile
import time

import numpy as np

THREADS = 2
METHODS = ("ants", "elastix")
_PACKAGES = {"ants": ("ants", "antspyx"), "elastix": ("itk", "itk-elastix")}


def _limit_threads():
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))
    os.environ.setdefault("ANTS_NUMBER_OF_THREADS", str(THREADS))


def _import(method):
    """The tool's module; raises ImportError when its package is missing."""
    _limit_threads()
    if method == "ants":
        import ants
        return ants
    if method == "elastix":
        import itk
        itk.ElastixRegistrationMethod  # noqa: B018 - AttributeError without itk-elastix
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(THREADS)
        return itk
    raise ValueError(f"unknown baseline {method!r}; expected one of {METHODS}")


def unavailable(method):
    """None when ``method`` can run here, else a one-line reason (missing package)."""
    package = _PACKAGES[method][1]
    try:
        _import(method)
    except (ImportError, AttributeError) as error:
        return (f"{method} skipped: {package} is not installed or does not import "
                f"({type(error).__name__}); `pip install {package}` or `pip install .[baselines]`")
    return None


def register(method, fixed, moving, moving_labels, spacing):
    """Register ``moving`` to ``fixed`` with a classical tool and carry the labels along.

    Args:
      method: ``"ants"`` or ``"elastix"``.
      fixed, moving: ``[X, Y, Z]`` float arrays on the same grid.
      moving_labels: ``[X, Y, Z]`` integer label map of the moving image.
      spacing: voxel size in mm per array axis (the prepared grid's).
    Returns:
      dict with ``warped_labels`` ``[X, Y, Z]`` int32 (nearest neighbour), ``flow``
      ``[X, Y, Z, 3]`` float32 (voxels, pulling; None if it could not be exported) and
      ``seconds`` (wall clock of the registration itself).
    """
    tool = _import(method)
    spacing = tuple(float(s) for s in spacing)
    fixed = np.ascontiguousarray(fixed, np.float32)
    moving = np.ascontiguousarray(moving, np.float32)
    labels = np.ascontiguousarray(moving_labels, np.float32)
    if method == "ants":
        return _register_ants(tool, fixed, moving, labels, spacing)
    return _register_elastix(tool, fixed, moving, labels, spacing)


def _register_ants(ants, fixed, moving, labels, spacing):
    def image(array):
        return ants.from_numpy(array, origin=(0.0, 0.0, 0.0), spacing=spacing)

    fixed_image, moving_image = image(fixed), image(moving)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = ants.registration(fixed_image, moving_image, type_of_transform="SyN",
                                   outprefix=os.path.join(folder, "ants_"))
        seconds = time.perf_counter() - start
        transforms = result["fwdtransforms"]
        warped = ants.apply_transforms(fixed_image, image(labels), transforms,
                                       interpolator="nearestNeighbor")
        # ``compose`` writes the chain (SyN warp, then affine) as one displacement field on
        # the fixed grid: physical mm along x, y, z, fixed point -> moving point (pulling).
        field_path = ants.apply_transforms(fixed_image, moving_image, transforms,
                                           compose=os.path.join(folder, "composed_"))
        field = ants.image_read(field_path).numpy()  # [X, Y, Z, 3]
    flow = (field / np.asarray(spacing)).astype(np.float32)
    return {"warped_labels": np.rint(warped.numpy()).astype(np.int32), "flow": flow,
            "seconds": seconds}


def _register_elastix(itk, fixed, moving, labels, spacing):
    # itk.image_from_array reads a numpy array as [z, y, x]: our array axis 2 is ITK's x.
    itk_spacing = spacing[::-1]

    def image(array):
        result = itk.image_from_array(array)
        result.SetSpacing(itk_spacing)
        return result

    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    fixed_image, moving_image = image(fixed), image(moving)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        _, transform = itk.elastix_registration_method(
            fixed_image, moving_image, parameter_object=parameters, log_to_console=False,
            output_directory=folder)  # number_of_threads=... crashes itk-elastix 0.25.4
    seconds = time.perf_counter() - start
    for index in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(index, "FinalBSplineInterpolationOrder", "0")
        transform.SetParameter(index, "ResampleInterpolator", "FinalNearestNeighborInterpolator")
    warped = itk.transformix_filter(image(labels), transform)
    with tempfile.TemporaryDirectory() as folder:
        field = itk.transformix_deformation_field(moving_image, transform,
                                                  output_directory=folder)
    field = np.asarray(itk.array_from_image(field), np.float64)  # [X, Y, Z, 3], ITK x, y, z
    flow = (field[..., ::-1] / np.asarray(spacing)).astype(np.float32)
    return {"warped_labels": np.rint(itk.array_from_image(warped)).astype(np.int32),
            "flow": flow, "seconds": seconds}
