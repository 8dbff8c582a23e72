"""MultiWorkerMirroredStrategy with two CPU worker processes on localhost."""

import json
import os
import socket
import subprocess
import sys

import pytest
import tensorflow as tf
from test_training import TINY, toy_manifest  # noqa: F401  (the fixture)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_together(toy_manifest, tmp_path):  # noqa: F811
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "vtn_tf.cli.train", "--config", str(TINY), "--progress", "0",
             "--run_dir", str(tmp_path / f"run{index}"), "--set", f"data.manifest={toy_manifest}",
             "--set", "train.distribute=multiworker", "--verbose"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    chief = tmp_path / "run0"
    assert tf.train.latest_checkpoint(str(chief / "checkpoints")).endswith("-8")
    assert not (tmp_path / "run1" / "checkpoints").exists()  # only the chief writes the run
    summary = json.loads(outputs[0][outputs[0].rindex('{\n  "run_dir"'):])
    assert summary["steps"] == 8
