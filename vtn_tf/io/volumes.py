"""Reading and writing volumes (NIfTI, MetaImage, NRRD) and label maps, with early, one-line errors.

Conventions:

* Volumes are 3-D arrays indexed ``[x, y, z]`` (nibabel order), whatever the file format.
* ``affine`` is the 4x4 nibabel affine mapping voxel indices ``(i, j, k, 1)`` to world
  coordinates in **RAS millimetres**. MetaImage / NRRD files (ITK, LPS world) are converted
  on reading.
* ``spacing`` is the voxel size in mm along each array axis (the affine's column norms).

Every problem with a user's file raises :class:`InputError`, whose message names the role
("moving image", "labels", ...), the file and the problem on one line. Writers never leave a
partial file behind: they write a temporary file in the target folder and rename it
(:func:`atomic_write_bytes`), or a whole staging folder (:func:`staged_folder`). Outputs are
checked before any work (:func:`check_output_file`, :func:`check_output_folder`).

This module does no tensor maths and imports no TensorFlow.
"""

import dataclasses
import gzip
import os
import zlib

import nibabel as nib
import numpy as np

from vtn_tf.core import geometry
from vtn_tf.io.errors import InputError, error_line
from vtn_tf.io.staging import atomic_write

PathLike = str | os.PathLike  # a file or folder name
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd")
MAX_SPACING_MM = 100.0


@dataclasses.dataclass
class Volume:
    """A 3-D volume and its geometry.

    Attributes:
      data: array of shape ``(X, Y, Z)``.
      affine: ``(4, 4)`` float64, voxel indices -> RAS mm.
      spacing: ``(3,)`` voxel size in mm per array axis.
      path: the file it was read from ("" when made in memory).
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple
    path: str = ""


def _name(path):
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def _suffix(path):
    lower = os.fspath(path).lower()
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if lower.endswith(suffix) and not (suffix == ".nii" and lower.endswith(".nii.gz")):
            return suffix
    return ""


def _check_file(path, role):
    if not os.path.exists(path):
        raise InputError(f"{role} {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{role} {path} is a folder; a volume file is required")
    if os.path.getsize(path) == 0:
        raise InputError(f"{role} {path} is empty (0 bytes)")
    if not _suffix(path):
        raise InputError(
            f"{role} {path} has an unsupported file type; expected one of "
            + ", ".join(NIFTI_SUFFIXES + ITK_SUFFIXES))


spacing_of = geometry.spacing  # the name the readers and data_prep use


def itk_to_ras_affine(spacing, direction, origin):
    """nibabel RAS affine from ITK geometry (LPS world; spacing/origin in mm, x,y,z order).

    ITK maps index ``i`` to ``origin + D @ diag(spacing) @ i`` in LPS; RAS flips x and y.
    """
    direction = np.asarray(direction, float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = geometry.LPS_FLIP @ direction @ np.diag(np.asarray(spacing, float))
    affine[:3, 3] = geometry.LPS_FLIP @ np.asarray(origin, float)
    return affine


def ras_affine_to_itk(affine):
    """Inverse of :func:`itk_to_ras_affine`: ``(spacing, direction (9,), origin)`` in LPS."""
    affine = np.asarray(affine, float)
    lps = geometry.LPS_FLIP @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    return tuple(spacing), tuple(direction.ravel()), tuple(geometry.LPS_FLIP @ affine[:3, 3])


def memory_limit():
    """Bytes one volume may take in memory: half the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def check_header(shape, itemsize, header_spacing, role, path):
    """Raise InputError, before any voxel is read, for a size beyond memory or negative spacing.

    Args:
      shape: array shape the header claims; itemsize: bytes per voxel (all components);
      header_spacing: voxel sizes as stored in the header (mm), before any repair.
    """
    name = _name(path)
    needed = int(np.prod([int(n) for n in shape], dtype=object)) * int(itemsize)
    if needed > memory_limit():
        raise InputError(f"{role} {name} claims {'x'.join(map(str, shape))} voxels "
                         f"({needed / 2**30:.1f} GiB); more than the {memory_limit() / 2**30:.1f} "
                         "GiB one volume may use (half this machine's memory)")
    if any(s < 0 for s in header_spacing):
        text = ", ".join(f"{s:g}" for s in header_spacing)
        raise InputError(f"{role} {name} has negative voxel spacing in its header ({text} mm)")


def _load_nifti(path, role):
    image = nib.load(path)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError("not a NIfTI image")
    with nib.openers.ImageOpener(path) as stream:  # as stored: nibabel repairs what it loads
        header = type(image.header).from_fileobj(stream, check=False)
    shape = header.get_data_shape()
    check_header(shape, header.get_data_dtype().itemsize,
                 [float(s) for s in header["pixdim"][1:1 + min(3, len(shape))]], role, path)
    return np.asanyarray(image.dataobj), np.asarray(image.affine, float)


def _load_itk(path, role):
    import SimpleITK as sitk  # only needed for MetaImage / NRRD

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    reader.ReadImageInformation()
    voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(),
                       reader.GetNumberOfComponents())
    check_header(reader.GetSize(), sitk.GetArrayViewFromImage(voxel).nbytes, reader.GetSpacing(),
                 role, path)
    image = reader.Execute()
    data = sitk.GetArrayFromImage(image)  # [z, y, x] (+ components)
    if image.GetNumberOfComponentsPerPixel() > 1:
        data = np.moveaxis(data, -1, 0)  # components first, then reversed to last
    data = data.transpose(tuple(range(data.ndim))[::-1])
    dimension = image.GetDimension()
    if dimension < 3:
        return data, np.eye(4)  # rejected by check_voxels
    direction = np.asarray(image.GetDirection()).reshape(dimension, dimension)[:3, :3]
    affine = itk_to_ras_affine(image.GetSpacing()[:3], direction, image.GetOrigin()[:3])
    return data, affine


def check_voxels(data, role, path):
    """Raise InputError unless ``data`` is a real, finite, 3-D array; return it as such.

    A 4-D array with trailing singleton axes is squeezed to 3-D.
    """
    data = np.asarray(data)
    name = _name(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = "x".join(str(n) for n in data.shape)
    if data.ndim < 3:
        raise InputError(f"{role} {name} is {data.ndim}-D ({shape}); a 3-D volume is required")
    if data.ndim > 3:
        raise InputError(
            f"{role} {name} is {data.ndim}-D ({shape}) with {int(np.prod(data.shape[3:]))} "
            "volumes; a single 3-D volume is required")
    if min(data.shape) < 2:
        raise InputError(f"{role} {name} has shape {shape} (a single slice); "
                         "a 3-D volume is required")
    if data.dtype == bool:
        raise InputError(f"{role} {name} has boolean voxels; a numeric volume is required")
    if np.iscomplexobj(data):
        raise InputError(f"{role} {name} has complex voxels ({data.dtype}); "
                         "a real-valued volume is required")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{role} {name} has non-numeric voxels ({data.dtype})")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(f"{role} {name} has {bad} NaN or infinite voxels")
    return data


def check_geometry(affine, role, path):
    """Raise InputError unless ``affine`` has positive, sane spacing and is invertible."""
    name = _name(path)
    affine = np.asarray(affine, float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{role} {name} has an invalid voxel-to-world affine")
    spacing = spacing_of(affine)
    text = ", ".join(f"{s:g}" for s in spacing)
    if min(spacing) <= 0:
        raise InputError(f"{role} {name} has non-positive voxel spacing ({text} mm)")
    if max(spacing) > MAX_SPACING_MM:
        raise InputError(f"{role} {name} has implausible voxel spacing ({text} mm; "
                         f"more than {MAX_SPACING_MM:g} mm)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(spacing):
        raise InputError(f"{role} {name} has a singular voxel-to-world affine "
                         "(its axes are not independent)")
    return spacing


def read_volume(path, role="image"):
    """Read a 3-D volume (.nii, .nii.gz, .mhd, .mha, .nrrd) and validate it.

    Args:
      path: file to read.
      role: what the file is for, used in error messages ("fixed image", "labels", ...).

    Returns:
      :class:`Volume` with data ``[X, Y, Z]`` in the file's dtype and a RAS-mm affine.

    Raises:
      InputError: missing, empty or unreadable file; a header claiming more voxels than fit
        in memory (checked before reading them); not 3-D; boolean, complex, NaN or infinite
        voxels; negative (header), non-positive, implausible (> 100 mm) or singular geometry.
    """
    path = os.fspath(path)
    _check_file(path, role)
    try:
        if _suffix(path) in NIFTI_SUFFIXES:
            data, affine = _load_nifti(path, role)
        else:
            data, affine = _load_itk(path, role)
    except InputError:
        raise
    except (MemoryError, OSError, EOFError, ValueError, RuntimeError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as error:
        raise InputError(f"{role} {_name(path)} could not be read as an image "
                         f"({error_line(error)[:160]})") from None
    data = check_voxels(data, role, path)
    spacing = check_geometry(affine, role, path)
    return Volume(data=data, affine=affine, spacing=spacing, path=path)


def read_labels(path, reference=None, role="labels"):
    """Read an integer label map; optionally check it lies on ``reference``'s grid.

    Args:
      path: label file.
      reference: a :class:`Volume` (usually the image) whose shape and affine the labels
        must match (affine to within 1e-3 mm).
      role: used in error messages.

    Returns:
      :class:`Volume` with int32 data. Negative ids are kept (callers decide what to do).
    """
    volume = read_volume(path, role)
    data = volume.data
    name = _name(path)
    if np.issubdtype(data.dtype, np.floating):
        fractional = data != np.round(data)
        if fractional.any():
            example = float(data[fractional].flat[0])
            raise InputError(f"{role} {name} has {int(fractional.sum())} non-integer values "
                             f"(e.g. {example:g}); integer label ids are required")
    if data.size and (data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max):
        raise InputError(f"{role} {name} has label ids outside the int32 range")
    volume.data = data.astype(np.int32)
    if reference is not None:
        ref_name = _name(reference.path) if reference.path else "the image"
        if volume.data.shape != reference.data.shape:
            shape = "x".join(map(str, volume.data.shape))
            ref_shape = "x".join(map(str, reference.data.shape))
            raise InputError(f"{role} {name} has grid {shape} but image {ref_name} has "
                             f"{ref_shape}; they must match voxel for voxel")
        if not np.allclose(volume.affine, reference.affine, rtol=0, atol=1e-3):
            diff = float(np.abs(volume.affine - reference.affine).max())
            raise InputError(f"{role} {name} has a different voxel-to-world affine than image "
                             f"{ref_name} (largest difference {diff:g}); they must match")
    return volume


def check_not_constant(volume, role="image"):
    """Raise InputError if every voxel of ``volume`` has the same value (e.g. all zeros)."""
    data = volume.data
    low, high = data.min(), data.max()
    if low == high:
        what = "all zeros" if low == 0 else f"constant (every voxel = {low:g})"
        raise InputError(f"{role} {_name(volume.path)} is {what}; an image with contrast "
                         "is required")


def _itk_voxels(data, path):
    """``data`` as SimpleITK wants it (``[z, y, x]`` or ``[z, y, x, components]``) and whether
    it is a vector image: ``[X, Y, Z]`` is scalar; ``[X, Y, Z, C]`` and NIfTI's vector layout
    ``[X, Y, Z, 1, C]`` are 3-D images of C-component vectors."""
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim == 3:
        return data.transpose(2, 1, 0), False
    if data.ndim == 4:
        return data.transpose(2, 1, 0, 3), True
    shape = "x".join(map(str, data.shape))
    raise InputError(f"output {path}: data of shape {shape} cannot be written as .mha/.nrrd; "
                     "[X, Y, Z], [X, Y, Z, C] or [X, Y, Z, 1, C] is required")


def nifti_image(data, affine, header=None, intent=None):
    """A NIfTI-1 image of ``data`` whose qform and sform both hold ``affine`` (voxel indices -> RAS
    mm, code 1: scanner space) with millimetre units, as every tool reads it back.

    Args:
      data: the voxel array (its dtype is the stored one).
      affine: ``(4, 4)`` voxel indices -> RAS mm.
      header: a NIfTI header to start from (kept fields: data type, scaling, descriptions).
      intent: a NIfTI intent name, e.g. ``"vector"`` for a displacement field.
    """
    image = nib.Nifti1Image(data, affine, header)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    if intent is not None:
        image.header.set_intent(intent)
    return image


def write_volume(path, data, affine, overwrite=False):
    """Write a 3-D (or vector) volume; never leaves a partial file.

    Args:
      path: ``.nii``/``.nii.gz`` (nibabel) or ``.mha``/``.nrrd`` (SimpleITK, converted to LPS).
      data: array ``[X, Y, Z]``, or for a vector image (e.g. a displacement field)
        ``[X, Y, Z, C]`` or ``[X, Y, Z, 1, C]``; written in its own dtype. NIfTI keeps the
        array's shape; .mha/.nrrd store a vector as a 3-D image with C components per voxel
        (index ``(x, y, z)`` holds ``data[x, y, z]``). The components are written as given:
        no unit or frame conversion (an ITK displacement field wants LPS millimetres).
      affine: ``(4, 4)`` voxel indices -> RAS mm (the geometry of the first three axes).
      overwrite: replace an existing file.
    """
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz", ".mha", ".nrrd"):
        raise InputError(f"output {path} must end in .nii, .nii.gz, .mha or .nrrd")
    data = np.asarray(data)
    affine = np.asarray(affine, float)

    def write_nifti(temporary):
        nib.save(nifti_image(data, affine), temporary)

    def write_itk(temporary):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(voxels, isVector=vector)
        spacing, direction, origin = ras_affine_to_itk(affine)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        image.SetOrigin(origin)
        sitk.WriteImage(image, temporary)

    if suffix not in NIFTI_SUFFIXES:
        voxels, vector = _itk_voxels(data, path)  # refused before any file is written
    return atomic_write(path, write_nifti if suffix in NIFTI_SUFFIXES else write_itk,
                         overwrite, suffix=suffix)


