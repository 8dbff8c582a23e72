"""Volumes made ready for a model, in numpy (augmentation in TensorFlow): the input contract and its
crop boxes, grid maps and intensities (`preparation`), the initial world-space alignment
(`alignment`), the random B-spline and affine augmentation (`augment`).
"""
