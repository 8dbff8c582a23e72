"""vtn_tf.io.folder_lock: a second process refuses at once; a killed holder blocks nobody."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from vtn_tf.io import faults, folder_lock

HOLD = ("import sys, time; from vtn_tf.io import folder_lock\n"
        "with folder_lock.locked(sys.argv[1]):\n"
        "    print('locked', flush=True); time.sleep(60)\n")


def holder(out):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_refuses_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "reg" / "s1"
    process = holder(out)
    try:
        begin = time.perf_counter()
        with pytest.raises(folder_lock.FolderBusy, match=rf"output folder .*s1 is in use by process {process.pid} "
                           r"on .* \(lock file .*/reg/\.s1\.lock\)") as raised:
            with folder_lock.locked(out):
                pass
        assert time.perf_counter() - begin < 1 and faults.status_of(raised.value) == faults.BUSY
    finally:
        process.kill()
        process.wait()
    assert not out.exists()  # the lock lives beside the folder, which it never creates


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "s1"
    process = holder(out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert folder_lock.lock_path(out).exists()  # left behind, its pid gone
    with folder_lock.locked(out) as path:
        assert path.read_text().split()[0] == str(os.getpid())
    assert not path.exists()


def test_the_same_folder_twice_in_one_process_is_refused_too(tmp_path):
    with folder_lock.locked(tmp_path / "a"):
        with pytest.raises(folder_lock.FolderBusy):
            with folder_lock.locked(tmp_path / "a"):
                pass
        with folder_lock.locked(tmp_path / "b"):
            pass
