import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as vtn_tf does, before any test imports TensorFlow
# The tools' compiled-kernel cache (vtn_tf.cli.common): one fresh folder per pytest run, shared
# by the command-line tools the tests start, never the user's own.
if "VTN_XLA_CACHE" not in os.environ:
    os.environ["VTN_XLA_CACHE"] = tempfile.mkdtemp(prefix="vtn-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["VTN_XLA_CACHE"], True)

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_root():
    """The real scans: ``VTN_DATA`` or ``../shared/data`` beside the repository."""
    return pathlib.Path(os.environ.get("VTN_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def vtn_data():
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set VTN_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """A run directory whose tiny AD model outputs exactly the zero flow."""
    import numpy as np

    from vtn_tf.nn.model import VTN
    from vtn_tf.training import loop

    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    affine, dense = model.stages
    for variable in (affine.matrix_head.kernel, affine.translation_head.kernel, dense.output_layer.kernel):
        variable.assign(np.zeros(variable.shape, np.float32))
    return loop.save_model_dir(model, (64, 64, 64), tmp_path_factory.mktemp("identity_run"))


def output_files(folder):
    """Every output of a folder: voxel arrays and texts (gzip headers hold a time stamp; the
    completion record and quality control's files hold seconds)."""
    import nibabel as nib
    import numpy as np

    from vtn_tf.io import completion

    found = {}
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if name.endswith((".nii", ".nii.gz")):
            found[name] = np.asarray(nib.load(path).dataobj)
        elif name != completion.RECORD_NAME and not name.startswith("qc."):
            found[name] = path.read_text()
    return found
