"""vtn-register --serve (`vtn_tf.serving.warm`): calls handed to a running server give the files a
fresh process gives, its errors and exit statuses, and the socket's safety and lifetime.

A tiny two-stage model with random weights (its fields are not zero, so equal outputs mean
something) serves small synthetic pairs; the server and the calls are subprocesses.
"""

import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO, output_files
from vtn_tf.serving import warm

SHAPE = (24, 20, 16)
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
FAST = ("--preset", "fast", "--set", "alignment.init=none", "--set", "output.qc=false")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A run directory of a DD model at an eighth of the paper's width with random weights."""
    import keras

    from vtn_tf.nn.model import VTN
    from vtn_tf.training import loop

    keras.utils.set_random_seed(3)
    model = VTN("DD", width=0.125)
    model.build((None, 64, 64, 64, 1))
    return loop.save_model_dir(model, (64, 64, 64), tmp_path_factory.mktemp("random_run"))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"), -1)
    for k in range(3):
        image = 3 + np.sin(grid[..., 0] / (4 + k)) + np.cos(grid[..., 1] / (5 - k)) + 0.1 * grid[..., 2]
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), str(folder / f"s{k}.nii.gz"))
    labels = (grid[..., 0] > 10).astype(np.int16) + 2 * (grid[..., 1] > 8)
    nib.save(nib.Nifti1Image(labels.astype(np.int16), AFFINE), str(folder / "s1_labels.nii.gz"))
    return folder


def environment(runtime):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XDG_RUNTIME_DIR=str(runtime))


def call(runtime, *args):
    command = [sys.executable, "-m", "vtn_tf.cli.register", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment(runtime), timeout=300)


@pytest.fixture(scope="module")
def server(random_run, tmp_path_factory):
    """A running ``--serve`` of ``random_run``: ``(process, runtime folder)``; its stdout lines
    are read as they come (the first says where it listens)."""
    runtime = tmp_path_factory.mktemp("runtime")
    os.chmod(runtime, 0o700)
    process = subprocess.Popen([sys.executable, "-m", "vtn_tf.cli.register", "--model", str(random_run), "--serve"],
                               cwd=REPO, env=environment(runtime), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    first = process.stdout.readline()
    assert first.startswith("serving "), first
    yield process, runtime
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_served_call_writes_what_a_fresh_process_writes(random_run, server, scans, tmp_path):
    process, runtime = server
    fixed, moving, labels = scans / "s0.nii.gz", scans / "s1.nii.gz", scans / "s1_labels.nii.gz"
    served = call(runtime, "--model", random_run, fixed, moving, "--out", tmp_path / "served",
                  "--moving_labels", labels, *FAST)
    assert served.returncode == 0, served.stderr
    assert "s1.nii.gz -> " in process.stdout.readline()  # the server did it
    alone = call(runtime, "--model", random_run, fixed, moving, "--out", tmp_path / "alone",
                 "--moving_labels", labels, *FAST, "--server", "off")
    assert alone.returncode == 0, alone.stderr
    mine, theirs = output_files(tmp_path / "served"), output_files(tmp_path / "alone")
    assert mine.keys() == theirs.keys() and "warped_labels_s1_labels.nii.gz" in mine
    flow = mine["flow_voxels.nii.gz"]
    assert np.abs(flow).max() > 1e-3  # a field that is not zero: equality below means something
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
    assert "wrote " in served.stdout and "wrote " in alone.stdout


def test_a_bad_call_gets_its_error_and_status_and_the_server_goes_on(random_run, server, scans, tmp_path):
    process, runtime = server
    missing = call(runtime, "--model", random_run, scans / "s0.nii.gz", scans / "absent.nii.gz",
                   "--out", tmp_path / "bad", *FAST)
    assert missing.returncode == 2
    assert "absent.nii.gz" in missing.stderr and "vtn-register: error:" in missing.stderr
    assert not (tmp_path / "bad").exists()
    assert "status 2" in process.stdout.readline()

    out = tmp_path / "twice"
    first = call(runtime, "--model", random_run, scans / "s0.nii.gz", scans / "s2.nii.gz", "--out", out, *FAST)
    assert first.returncode == 0, first.stderr
    before = output_files(out)
    again = call(runtime, "--model", random_run, scans / "s0.nii.gz", scans / "s1.nii.gz", "--out", out, *FAST)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    after = output_files(out)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    bad_setting = call(runtime, "--model", random_run, scans / "s0.nii.gz", scans / "s1.nii.gz",
                       "--out", tmp_path / "setting", "--set", "refine.rate=-1")
    assert bad_setting.returncode == 2 and "rate" in bad_setting.stderr
    assert process.poll() is None


def test_a_second_server_of_the_same_model_is_refused_and_sigterm_removes_the_socket(random_run, server):
    process, runtime = server
    second = call(runtime, "--model", random_run, "--serve")
    assert second.returncode == 2 and "already listens" in second.stderr
    assert process.poll() is None  # its probe did not stop the running server
    path = warm.socket_path(random_run, {"XDG_RUNTIME_DIR": str(runtime)})
    assert os.path.exists(path) and oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not os.path.exists(path)
    assert warm.request(random_run, {"fixed": "f", "moving": "m", "out": "o"},
                        environ={"XDG_RUNTIME_DIR": str(runtime)}) is None  # no server: the caller registers


def test_no_socket_in_a_folder_others_may_open(tmp_path):
    shared = tmp_path / "vtn-tf"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(warm.ServerError, match="not a private folder"):
        warm.socket_folder({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert warm.request(tmp_path, {"fixed": "f", "moving": "m", "out": "o"},
                        environ={"XDG_RUNTIME_DIR": str(tmp_path)}) is None
    os.chmod(shared, 0o700)
    assert warm.socket_folder({"XDG_RUNTIME_DIR": str(tmp_path)}) == str(shared)


def test_each_model_has_its_own_socket_named_by_its_real_path(tmp_path):
    environ = {"XDG_RUNTIME_DIR": str(tmp_path)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert warm.socket_path(tmp_path / "a", environ) == warm.socket_path(tmp_path / "link", environ)
    assert warm.socket_path(tmp_path / "a", environ) != warm.socket_path(tmp_path / "b", environ)
    assert len(warm.socket_path(tmp_path / "a", environ)) < 108  # the limit of a Unix socket's path


def test_a_server_of_an_unusable_model_says_so_and_leaves_no_socket(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    (tmp_path / "notarun").mkdir()
    refused = call(runtime, "--model", tmp_path / "notarun", "--serve")
    assert refused.returncode == 2
    assert "vtn-register: error:" in refused.stderr and "notarun" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert os.listdir(runtime / "vtn-tf") == []
