"""Data preparation: raw datasets -> cropped, resampled, normalised volumes + manifest.json.

Run ``python -m data_prep --help``. The output folder holds ``images/ID.nii.gz`` (float32 in
[0, 1]), ``labels/ID.nii.gz`` (int16), optional ``landmarks/ID.csv`` (``x,y,z`` voxel
coordinates of the prepared grid) and ``manifest.json`` (format ``vtn-tf-dataset/1``, read by
:func:`vtn_tf.io.load_manifest`). Every prepared volume keeps world space: its affine maps
voxel indices of the new grid to the same RAS millimetres as the original.
"""
