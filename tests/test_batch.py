"""vtn_tf.batch / vtn-register --pairs: spreadsheet files, resume, shards, locks and faults.

A tiny identity model (a VTN with zeroed heads) registers small synthetic pairs; the
command-line runs are subprocesses (one is killed with SIGKILL mid-batch), the rest runs in
this process with a `vtn_tf.registration.Registrar`.
"""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import uuid

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO, output_files
from vtn_tf import io
from vtn_tf.io import completion, faults, folder_lock, pairs
from vtn_tf.registration import batch, outputs, pipeline
from vtn_tf.registration.settings import AlignmentSettings, NetworkSettings, RegistrationSettings

SHAPE = (24, 20, 16)
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
QUIET = {"log": lambda *_: None}
NO_INIT = RegistrationSettings(alignment=AlignmentSettings(init="none"))  # the synthetic pairs share a header


@pytest.fixture(scope="module")
def registrar(identity_run):
    return pipeline.Registrar(str(identity_run), NO_INIT, **QUIET)


def cohort(folder, pairs=4):
    """``pairs`` synthetic scans in ``folder/scans, rescans`` (a comma and a space in the
    folder's name); returns the rows of a pairs file as Excel's "CSV UTF-8" writes it."""
    scans = folder / "scans, rescans"
    scans.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"), -1)
    for k in range(pairs + 1):
        image = 3 + np.sin(grid[..., 0] / (4 + k)) + np.cos(grid[..., 1] / 5) + 0.1 * grid[..., 2]
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), str(scans / f"s{k}.nii.gz"))
    lines = ["out,fixed,moving", "# the fixed scan is s0"]
    lines += [f'reg/p{k},"scans, rescans/s0.nii.gz","scans, rescans/s{k}.nii.gz"' for k in range(1, pairs + 1)]
    path = folder / "cohort.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines[:3] + [""] + lines[3:]) + "\r\n").encode("utf-8"))
    return path


def cli(*args, **popen):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "vtn_tf.cli.register", *map(str, args)]
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=180)


def quiet_run(registrar, rows, **options):
    with open(os.devnull, "w") as sink:
        return batch.run(registrar, rows, stream=sink, **options)


def test_a_killed_batch_resumes_to_the_outputs_of_an_uninterrupted_run(identity_run, registrar, tmp_path):
    pairs_file = cohort(tmp_path / "killed", pairs=5)
    process = cli("--model", identity_run, "--pairs", pairs_file, "--set", "alignment.init=none",
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    done = 0
    for line in process.stdout:
        done += " ok, " in line
        if done == 2:
            process.send_signal(signal.SIGKILL)  # during the third pair
            break
    process.wait()
    assert done == 2
    resumed = cli("--model", identity_run, "--pairs", pairs_file, "--set", "alignment.init=none")
    assert resumed.returncode == 0, resumed.stderr
    last = resumed.stdout.splitlines()[-1]
    registered, skipped = int(last.split(" of ")[0]), int(last.split("; ")[1].split()[0])
    assert skipped >= 2 and registered + skipped == 5, last
    assert "cohort summary: 5 of 5 pairs complete" in resumed.stdout

    reference = cohort(tmp_path / "uninterrupted", pairs=5)
    assert quiet_run(registrar, pairs.read_pairs(reference)).registered == 5
    for k in range(1, 6):
        mine = output_files(tmp_path / "killed" / "reg" / f"p{k}")
        theirs = output_files(tmp_path / "uninterrupted" / "reg" / f"p{k}")
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"p{k}/{name}")
    leftovers = [n for n in os.listdir(tmp_path / "killed" / "reg") if n.startswith(".") and n.endswith(".lock")]
    assert not leftovers


def test_complete_folders_are_skipped_other_settings_refused_and_overwrite_redoes(identity_run, registrar, tmp_path):
    rows = pairs.read_pairs(cohort(tmp_path, pairs=2))
    assert quiet_run(registrar, rows).registered == 2
    again = quiet_run(registrar, rows)
    assert (again.registered, again.skipped, again.status) == (0, 2, faults.OK)
    two_passes = pipeline.Registrar(str(identity_run),
                                    RegistrationSettings(NO_INIT.alignment, NetworkSettings(passes=2)), **QUIET)
    refused = quiet_run(two_passes, rows)
    assert refused.status == faults.PAIRS_FAILED and len(refused.failures) == 2
    assert str(refused.failures[0][1]).endswith("was made with other settings (network.passes); pass --overwrite "
                                                "to replace it")
    redone = quiet_run(two_passes, rows, overwrite=True)
    assert redone.registered == 2
    assert completion.read_record(rows[0]["out"])["settings"]["network"]["passes"] == 2
    # a listed output gone: the folder is incomplete and refused as existing without --overwrite
    os.remove(os.path.join(rows[1]["out"], "flow_itk.nii.gz"))
    assert batch.state(two_passes, rows[1]["fixed"], rows[1]["moving"], rows[1]["out"])[0] == completion.INCOMPLETE


def test_two_shards_are_the_whole_and_the_summary_is_rebuilt_from_both(registrar, tmp_path, capsys):
    pairs_file = cohort(tmp_path, pairs=5)
    rows = pairs.read_pairs(pairs_file)
    first = quiet_run(registrar, pairs.shard(rows, 0, 2), all_rows=rows, summary=pairs_file)
    assert first.registered == 3
    summary = batch.summary_path(pairs_file)
    assert [entry["state"] for entry in csv.DictReader(open(summary))] == [
        "complete", "absent", "complete", "absent", "complete"]
    second = quiet_run(registrar, pairs.shard(rows, 1, 2), all_rows=rows, summary=pairs_file)
    assert second.registered == 2
    assert sorted(os.listdir(tmp_path / "reg")) == [f"p{k}" for k in range(1, 6)]
    table = batch.summarise(rows, pairs_file)
    assert capsys.readouterr().out.startswith("cohort summary: 5 of 5 pairs complete")
    assert [entry["state"] for entry in table] == ["complete"] * 5
    assert len({entry["model_sha256"] for entry in table}) == 1


def test_summary_only_needs_no_model(tmp_path):
    pairs_file = cohort(tmp_path, pairs=2)
    done = cli("--pairs", pairs_file, "--summary_only")
    assert done.returncode == 0, done.stderr
    assert "cohort summary: 0 of 2 pairs complete (2 absent)" in done.stdout
    assert os.path.exists(tmp_path / "cohort.summary.csv")


def test_a_full_disk_stops_the_batch_on_one_line(registrar, tmp_path, monkeypatch):
    rows = pairs.read_pairs(cohort(tmp_path, pairs=3))

    def full(image, path, compression):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_image", full)
    outcome = quiet_run(registrar, rows)
    assert outcome.status == faults.DISK_FULL and outcome.not_attempted == 2
    assert str(outcome.failures[0][1]) == f"output folder {rows[0]['out']}: no space left on device"
    # nothing partial, no staging folder, no lock file: not even the folder made to hold them
    assert not (tmp_path / "reg").exists()


@pytest.mark.parametrize("code,message", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_an_unwritable_folder_fails_its_pair_and_the_batch_goes_on(registrar, tmp_path, monkeypatch, code, message):
    rows = pairs.read_pairs(cohort(tmp_path, pairs=3))
    save = outputs.save_image

    def refusing(image, path, compression):
        if f"{os.sep}.p2." in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return save(image, path, compression)

    monkeypatch.setattr(outputs, "save_image", refusing)
    outcome = quiet_run(registrar, rows)
    assert (outcome.registered, outcome.status) == (2, faults.PAIRS_FAILED)
    (row, error), = outcome.failures
    assert row["line"] == 5 and str(error) == f"output folder {row['out']}: {message}"
    assert faults.status_of(error) == faults.NOT_WRITABLE
    assert sorted(os.listdir(tmp_path / "reg")) == ["p1", "p3"]


def test_a_vanished_input_and_a_busy_folder_fail_their_pairs_only(registrar, tmp_path):
    rows = pairs.read_pairs(cohort(tmp_path, pairs=3))
    os.remove(rows[0]["moving"])  # removed after the pairs file was read
    with folder_lock.locked(rows[1]["out"]):
        outcome = quiet_run(registrar, rows)
    assert outcome.registered == 1 and outcome.status == faults.PAIRS_FAILED
    messages = [str(error) for _, error in outcome.failures]
    assert messages[0] == f"moving image {rows[0]['moving']} does not exist"
    assert messages[1].startswith(f"output folder {rows[1]['out']} is in use by process {os.getpid()} on ")


def test_a_model_without_its_checkpoint_is_refused(identity_run, tmp_path):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "model.json").write_text((identity_run / "model.json").read_text())
    with pytest.raises(io.InputError, match=r"model .*run cannot be used: .*run holds no checkpoint"):
        pipeline.Registrar(str(broken), **QUIET)


def _mount_tmpfs(folder, options):
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"vtn-test-{uuid.uuid4().hex[:8]}", str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    folder = _mount_tmpfs(tmp_path / "disk", "size=360k")  # one pair of outputs fits, not two
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    folder = _mount_tmpfs(tmp_path / "readonly", "size=1m,ro")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_and_a_read_only_one_from_the_command_line(identity_run, tmp_path, small_disk, read_only_disk):
    pairs_file = cohort(tmp_path, pairs=4)
    rows = pairs.read_pairs(pairs_file)
    lines = ["fixed,moving,out", f'"{rows[0]["fixed"]}","{rows[0]["moving"]}",{read_only_disk / "p1"}']
    lines += [f'"{row["fixed"]}","{row["moving"]}",{small_disk / name}' for row, name in zip(rows[1:], "abc")]
    (tmp_path / "disks.csv").write_text("\n".join(lines) + "\n")
    done = cli("--model", identity_run, "--pairs", tmp_path / "disks.csv", "--set", "alignment.init=none",
               "--set", "output.compression=0")
    assert done.returncode == faults.DISK_FULL, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    out = done.stdout
    assert f"FAILED: output folder {read_only_disk} is not writable (read-only file system)" in out
    assert f"FAILED: output folder {small_disk / 'b'}: no space left on device" in out
    assert "the batch stopped at a full disk, 1 pairs not attempted" in out.splitlines()[-1]
    assert sorted(os.listdir(small_disk)) == ["a"]  # the pair that fitted, nothing partial beside it

    single = cli("--model", identity_run, rows[0]["fixed"], rows[0]["moving"], "--out", small_disk / "d",
                 "--set", "alignment.init=none", "--set", "output.compression=0")
    assert single.returncode == faults.DISK_FULL
    assert single.stderr.strip().splitlines()[-1] == (f"vtn-register: error: output folder {small_disk / 'd'}: "
                                                      "no space left on device")
    readonly = cli("--model", identity_run, rows[0]["fixed"], rows[0]["moving"], "--out", read_only_disk / "e")
    assert readonly.returncode == faults.NOT_WRITABLE
    assert readonly.stderr.strip().splitlines()[-1] == (f"vtn-register: error: output folder {read_only_disk} is "
                                                        "not writable (read-only file system)")


def test_a_second_process_on_the_same_output_folder_refuses_at_once(identity_run, tmp_path):
    rows = pairs.read_pairs(cohort(tmp_path, pairs=1))
    out = tmp_path / "reg" / "p1"
    with folder_lock.locked(out):
        second = cli("--model", identity_run, rows[0]["fixed"], rows[0]["moving"], "--out", out)
    assert second.returncode == faults.BUSY
    assert second.stderr.strip().splitlines()[-1] == (
        f"vtn-register: error: output folder {out} is in use by process {os.getpid()} on {os.uname().nodename} "
        f"(lock file {tmp_path / 'reg' / '.p1.lock'})")
    assert "model" not in second.stdout  # refused before the model loads
    assert not out.exists()


def test_the_quality_control_report_is_rebuilt_when_folders_hold_qc_json(registrar, tmp_path, capsys):
    pytest.importorskip("vtn_tf.qc.report")
    pairs_file = cohort(tmp_path, pairs=3)
    rows = pairs.read_pairs(pairs_file)
    quiet_run(registrar, rows[:2])
    for row, suspect in zip(rows[:2], (True, False)):
        flags = [{"flag": "folding", "reason": "2.0 % of the voxels fold"}] if suspect else []
        qc = {"suspect": suspect, "flags": flags, "similarity": {"after": {"lcc": 0.5 if suspect else 0.9}}}
        (tmp_path / row["out"] / "qc.json").write_text(json.dumps(qc))
    table = batch.summarise(rows, pairs_file)
    printed = capsys.readouterr().out
    assert "cohort summary: 2 of 3 pairs complete (1 absent); 1 flagged suspect by quality control" in printed
    assert [entry["suspect"] for entry in table] == ["true", "false", ""]
    assert [entry["qc_flags"] for entry in table] == ["folding", "", ""]
    report = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert sorted(entry["status"] for entry in report) == ["failed", "ok", "suspect"]
