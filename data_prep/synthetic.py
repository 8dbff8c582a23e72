"""SYNTHETIC CT-like images from abdominal organ label maps (a stand-in, not real CT).

The Learn2Reg abdomen label maps (BTCV organ ids) come without their CT images. To exercise
the liver pipeline on real organ shapes we paint each organ with a typical contrast-enhanced
Hounsfield value, put soft tissue (0 HU) inside an elliptical body outline and air
(-1000 HU) outside, add correlated texture noise and a slight blur. Results on such images
must be reported as synthetic.
"""

import numpy as np
from scipy import ndimage

# BTCV / Learn2Reg task 3 ids -> (name, Hounsfield-like value).
ORGANS = {
    1: ("spleen", 50.0),
    2: ("right kidney", 150.0),
    3: ("left kidney", 150.0),
    4: ("gallbladder", 10.0),
    5: ("esophagus", 40.0),
    6: ("liver", 60.0),
    7: ("stomach", 20.0),
    8: ("aorta", 180.0),
    9: ("inferior vena cava", 180.0),
    10: ("portal and splenic vein", 180.0),
    11: ("pancreas", 40.0),
    12: ("right adrenal gland", 30.0),
    13: ("left adrenal gland", 30.0),
}
SOFT_TISSUE_HU = 0.0
AIR_HU = -1000.0
BODY_MARGIN_MM = 25.0
TEXTURE_HU = 12.0
NOISE_HU = 6.0
BLUR_MM = 1.5

NOTE = ("SYNTHETIC CT-like images painted from real organ label maps (organ-wise "
        "Hounsfield-like values, texture noise, blur); not real CT - report results as such")


def body_mask(labels, spacing):
    """Elliptical cylinder (along the last axis) around all organs, widened by a margin."""
    organs = labels > 0
    if not organs.any():
        return np.ones(labels.shape, bool)
    in_plane = organs.any(axis=2)
    xs, ys = np.nonzero(in_plane)
    centre = np.array([(xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0])
    radii = np.array([(xs.max() - xs.min()) / 2.0 + BODY_MARGIN_MM / spacing[0],
                      (ys.max() - ys.min()) / 2.0 + BODY_MARGIN_MM / spacing[1]])
    x = (np.arange(labels.shape[0])[:, None] - centre[0]) / radii[0]
    y = (np.arange(labels.shape[1])[None, :] - centre[1]) / radii[1]
    ellipse = (x ** 2 + y ** 2) <= 1.0
    return np.broadcast_to(ellipse[:, :, None], labels.shape) | organs


def synthesize_ct(labels, spacing, seed):
    """Float32 CT-like volume in HU from an integer organ label map ``[X, Y, Z]``."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, float)
    values = np.full(int(max(labels.max(), 0)) + 1, SOFT_TISSUE_HU, np.float32)
    for label, (_, hounsfield) in ORGANS.items():
        if label < len(values):
            values[label] = hounsfield
    image = values[np.clip(labels, 0, None)]
    texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape, np.float32),
                                      sigma=2.0 / spacing)
    texture *= TEXTURE_HU / max(float(texture.std()), 1e-6)
    image += texture + rng.normal(0.0, NOISE_HU, labels.shape).astype(np.float32)
    image[~body_mask(labels, spacing)] = AIR_HU
    return ndimage.gaussian_filter(image, sigma=BLUR_MM / spacing).astype(np.float32)
