"""The cascade's description: the spec string (``"ADDD"``), its stage names, and the paper's default
arguments of `vtn_tf.nn.model.VTN` (the ``model`` section of every experiment config starts
from these).

Standard library only: the configuration (`vtn_tf.training.config`) and the model both read it.
"""

import re

# The paper's arguments of the cascade (Table I, ADDD); every experiment's model section starts here.
MODEL_DEFAULTS = {
    "spec": "ADDD",
    "width": 1.0,
    "flow_scale": 20.0,
    "flow_head_initializer": "lecun_uniform",
    "similarity_weights": "paper",
    "smoothness_weights": None,
    "determinant_weight": 0.1,
    "orthogonality_weight": 0.1,
    "invertibility_weight": 0.0,
    "central_fraction": 0.5,
    "similarity": "cc",           # "cc": the paper's global correlation; "ncc": local (not in the paper)
    "ncc_window": 9,              # voxels, for "ncc"
    "label_weight": 0.0,          # soft Dice on warped training labels (0: unsupervised, the paper)
    "folding_weight": 0.0,        # penalty on negative Jacobian determinants of the final flow (not in the paper)
}


# The network's compute type at inference -> its Keras mixed-precision policy.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}

SPEC_PATTERN = re.compile(r"^A?D*$")


# Paper Table I (ADDD): similarity on the dense stages, counted from the last one.
PAPER_DENSE_SIMILARITY = (0.0, 0.05, 1.0)


SIMILARITIES = ("cc", "ncc")


def parse_spec(spec):
    """Validate a cascade spec such as "ADDD"; returns it as a string of stage letters."""
    if not isinstance(spec, str) or not spec or not SPEC_PATTERN.match(spec):
        raise ValueError(
            f"spec must be at most one leading 'A' (affine) followed by 'D's (dense), e.g. "
            f"'ADDD', 'ADD', 'D', 'A'; got {spec!r}.")
    return spec


def stage_names(spec):
    names, dense = [], 0
    for letter in spec:
        if letter == "A":
            names.append("affine")
        else:
            dense += 1
            names.append(f"dense{dense}")
    return names


def default_similarity_weights(spec, preset="paper"):
    """Per-stage similarity weights. ``"paper"``: Table I (affine 1; dense stages
    …, 0, 0.05, 1 counted back from the last). ``"last"``: the authors' code, 1 on the
    last stage only."""
    n_dense = spec.count("D")
    if preset == "last":
        weights = [0.0] * len(spec)
        weights[-1] = 1.0
        return weights
    if preset != "paper":
        raise ValueError(f"similarity preset must be 'paper' or 'last'; got {preset!r}.")
    dense = list(PAPER_DENSE_SIMILARITY[-n_dense:]) if n_dense else []
    dense = [0.0] * (n_dense - len(dense)) + dense
    return ([1.0] if spec.startswith("A") else []) + dense


def check_ncc_window(window):
    """ValueError unless ``window`` is a positive odd int (a cube side in voxels)."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"ncc_window must be a positive odd number of voxels; got {window!r}.")
