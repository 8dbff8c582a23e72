"""File input and output without TensorFlow: volumes and label maps (`vtn_tf.io.volumes`), outputs that
appear whole or not at all (`vtn_tf.io.staging`), dataset manifests and landmarks (`vtn_tf.io.manifests`),
and the one-line user error (`vtn_tf.io.errors`). The names below are the package's public API."""

from vtn_tf.io.errors import InputError, OutputNotWritable, error_line
from vtn_tf.io.manifests import MANIFEST_FORMAT, load_manifest, read_landmarks
from vtn_tf.io.staging import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_output_file,
    check_output_folder,
    staged_folder,
)
from vtn_tf.io.volumes import (
    ITK_SUFFIXES,
    MAX_SPACING_MM,
    NIFTI_SUFFIXES,
    Volume,
    check_geometry,
    check_header,
    check_not_constant,
    check_voxels,
    itk_to_ras_affine,
    memory_limit,
    nifti_image,
    ras_affine_to_itk,
    read_labels,
    read_volume,
    spacing_of,
    write_volume,
)

__all__ = [
    "ITK_SUFFIXES",
    "InputError",
    "MANIFEST_FORMAT",
    "MAX_SPACING_MM",
    "NIFTI_SUFFIXES",
    "OutputNotWritable",
    "Volume",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_geometry",
    "check_header",
    "check_not_constant",
    "check_output_file",
    "check_output_folder",
    "check_voxels",
    "error_line",
    "itk_to_ras_affine",
    "load_manifest",
    "memory_limit",
    "nifti_image",
    "ras_affine_to_itk",
    "read_labels",
    "read_landmarks",
    "read_volume",
    "spacing_of",
    "staged_folder",
    "write_volume",
]
