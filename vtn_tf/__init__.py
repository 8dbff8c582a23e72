"""vtn-tf: the Volume Tweening Network (unsupervised 3-D registration) in TensorFlow 2 / Keras 3.

Field conventions (everywhere): images ``[B, X, Y, Z, C]``, flows ``[B, X, Y, Z, 3]``
as displacements in voxels of the fixed grid, channel c along axis c, pulling:
``warp(moving, f)(x) = moving(x + f(x))``.
"""

from vtn_tf import losses, metrics
from vtn_tf.model import VTN
from vtn_tf.networks import AffineSubnetwork, DenseSubnetwork
from vtn_tf.spatial import affine_flow, compose, warp

__version__ = "0.1.0"
__all__ = ["AffineSubnetwork", "DenseSubnetwork", "VTN", "affine_flow", "compose", "losses",
           "metrics", "warp"]
