"""`make demo` (vtn_tf.cli.demo), the newcomer's first command, end to end on synthetic volumes:
it prepares data, trains a few steps, prints the before/after Dice table, draws the picture and
registers one pair with the vtn-register code into files in the fixed image's space."""

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO


def test_demo_runs_end_to_end_on_synthetic_volumes(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    command = [sys.executable, "-m", "vtn_tf.cli.demo", "--synthetic", "--steps", "4", "--pairs", "2",
               "--prepared", str(tmp_path / "prepared"), "--run_dir", str(tmp_path / "run"),
               "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "SYNTHETIC" in done.stdout  # says the data are not real scans

    rows = re.findall(r"^\| (\S+) \| (\S+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", done.stdout, re.M)
    assert len(rows) == 2, done.stdout[-2000:]
    for _, _, before, after, folding in rows:
        assert 0.0 <= float(before) <= 1.0 and 0.0 <= float(after) <= 1.0 and float(folding) >= 0.0

    picture = matplotlib.image.imread(tmp_path / "out" / "demo.png")
    assert picture.ndim == 3 and picture.shape[1] > 2 * picture.shape[0] and picture.std() > 0.01  # 4 panels

    manifest = json.loads((tmp_path / "prepared" / "toy" / "manifest.json").read_text())
    subjects = {s["id"]: s for s in manifest["subjects"]}
    fixed_id = rows[0][0]
    fixed = nib.load(tmp_path / "prepared" / "toy" / subjects[fixed_id]["image"])
    written = tmp_path / "out" / "registration"
    for name in ("warped.nii.gz", "flow_voxels.nii.gz", "flow_itk.nii.gz"):
        image = nib.load(written / name)
        assert image.shape[:3] == fixed.shape and np.allclose(image.affine, fixed.affine, atol=1e-5), name
    assert any(p.name.startswith("warped_labels_") for p in written.iterdir())
