"""vtn_tf.cli.common: which errors become one-line messages (exit 2) and which keep their traceback."""

import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vtn_tf.cli.common import user_errors
from vtn_tf.io import InputError
from vtn_tf.training.config import ConfigError


@pytest.mark.parametrize("error", [
    InputError("moving image m.nii.gz is 2-D (16x16); a 3-D volume is required"),
    ConfigError("config c.json: unknown field model.widht"),
    FileNotFoundError("model runs/x does not exist"),
    FileExistsError("output out.csv already exists"),
    PermissionError(errno.EACCES, "Permission denied", "out/flow.nii.gz"),
])
def test_user_errors_become_one_line(error, capsys):
    with pytest.raises(SystemExit) as exit_:
        with user_errors("vtn-tool"):
            raise error
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vtn-tool: error: ") and "Traceback" not in err


@pytest.mark.parametrize("error", [KeyError("spec"), OSError("device not ready"), ValueError("bad shape"),
                                   IsADirectoryError("x"), FloatingPointError("overflow"), TypeError("bug")])
def test_other_errors_keep_their_traceback(error, capsys):
    with pytest.raises(type(error)):
        with user_errors("vtn-tool"):
            raise error
    assert capsys.readouterr().err == ""


def test_verbose_keeps_the_traceback_of_user_errors():
    with pytest.raises(InputError):
        with user_errors("vtn-tool", verbose=True):
            raise InputError("labels l.nii.gz has 3 non-integer values")


# ---- the compiled-kernel cache ---------------------------------------------------------------

def test_compile_cache_folder_is_keyed_by_tensorflow_and_cpu(tmp_path):
    from importlib.metadata import version

    from vtn_tf.cli import compile_cache

    folder = compile_cache.compile_cache_folder({"VTN_XLA_CACHE": str(tmp_path)})
    parent, name = os.path.split(folder)
    assert parent == str(tmp_path)
    assert name == f"tf{version('tensorflow')}-{compile_cache.machine_key()}"
    assert len(compile_cache.machine_key()) == 12 and compile_cache.machine_key() == compile_cache.machine_key()
    default = compile_cache.compile_cache_folder({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert os.path.dirname(default) == str(tmp_path / "xdg" / "vtn-tf" / "xla")


@pytest.mark.parametrize("environ", [{"VTN_XLA_CACHE": "off"}, {"VTN_XLA_CACHE": "0"}, {"VTN_XLA_CACHE": ""},
                                     {"TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/elsewhere"}])
def test_compile_cache_off_or_left_to_the_user(environ):
    from vtn_tf.cli import compile_cache

    before = dict(environ)
    assert compile_cache.compile_cache_folder(environ) is None
    assert compile_cache.configure_compile_cache(environ) is None and environ == before


def _entry_bytes(fields):
    """A protocol buffer of length-delimited ``fields`` {number: bytes}, encoded by hand."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return b"".join(varint(number << 3 | 2) + varint(len(value)) + value for number, value in fields.items())


def test_complete_entry_reads_the_fields_to_the_end(tmp_path):
    from vtn_tf.cli import compile_cache

    whole = _entry_bytes({1: b"k" * 53, 2: b"h" * 300, 3: b"e" * 70000})
    cases = {"whole": (whole, True), "cut": (whole[:-1], False), "cut_in_a_header": (whole[:56], False),
             "no_executable": (_entry_bytes({1: b"k", 2: b"h"}), False), "empty": (b"", False),
             "varint_field": (b"\x08\x01" + whole, False), "trailing": (whole + b"\x00", False)}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert compile_cache.complete_entry(tmp_path / name) is expected, name
    assert compile_cache.complete_entry(tmp_path / "missing") is False


def test_configure_compile_cache_appends_to_the_users_xla_flags(tmp_path):
    from vtn_tf.cli import compile_cache

    environ = {"VTN_XLA_CACHE": str(tmp_path), "TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}
    workspace = compile_cache.configure_compile_cache(environ)
    folder = compile_cache.compile_cache_folder({"VTN_XLA_CACHE": str(tmp_path)})
    assert os.path.dirname(workspace) == folder and os.path.basename(workspace).startswith(".process-")
    assert environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={workspace}"
    assert environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    compile_cache.publish(workspace, folder)
    assert not os.path.exists(workspace)
    child = {key: environ[key] for key in ("VTN_XLA_CACHE", "TF_XLA_FLAGS", "VTN_XLA_WORKSPACE")}
    own = compile_cache.configure_compile_cache(child)  # a tool started by this one: a workspace of its own
    assert own != workspace and os.path.dirname(own) == folder
    assert child["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={own}"
    compile_cache.publish(own, folder)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert compile_cache.configure_compile_cache({"VTN_XLA_CACHE": str(blocked)}) is None  # cannot be created


def test_workspaces_link_complete_entries_publish_new_ones_and_stale_ones_go(tmp_path):
    import socket

    from vtn_tf.cli import compile_cache

    folder = compile_cache.compile_cache_folder({"VTN_XLA_CACHE": str(tmp_path)})
    os.makedirs(folder)
    good, cut = _entry_bytes({1: b"k", 2: b"h", 3: b"e" * 100}), _entry_bytes({1: b"k", 2: b"h", 3: b"e" * 100})[:-3]
    (pathlib.Path(folder) / "good.pb").write_bytes(good)
    (pathlib.Path(folder) / "cut.pb").write_bytes(cut)
    host = socket.gethostname().replace("-", "_")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = (pathlib.Path(folder) / f".process-{host}-{int(gone.stdout)}-abc",
                  pathlib.Path(folder) / f".process-{host}-{os.getpid()}-def")
    dead.mkdir()
    live.mkdir()
    workspace = pathlib.Path(compile_cache.configure_compile_cache({"VTN_XLA_CACHE": str(tmp_path)}))
    assert not dead.exists() and live.exists()  # the dead process's workspace removed, ours kept
    assert not (pathlib.Path(folder) / "cut.pb").exists()  # an incomplete entry is deleted
    assert sorted(p.name for p in workspace.iterdir()) == ["good.pb"]
    assert (workspace / "good.pb").read_bytes() == good
    (workspace / "new.pb").write_bytes(good)  # compiled by this process
    (workspace / "partial.pb").write_bytes(cut)  # cut short: never published
    compile_cache.publish(workspace, folder)
    assert not workspace.exists()
    assert sorted(p.name for p in pathlib.Path(folder).iterdir() if p.is_file()) == ["good.pb", "new.pb"]


def test_prune_compile_cache_deletes_the_oldest_first(tmp_path):
    from vtn_tf.cli import compile_cache

    for k in range(5):  # 5 files of 0.4 MiB, k = 0 the oldest
        path = tmp_path / f"entry{k}.pb"
        path.write_bytes(b"x" * (400 << 10))
        os.utime(path, (1000 + k, 1000 + k))
    assert compile_cache.prune_compile_cache(tmp_path, 1.0) == 3  # 2.0 MiB down to 0.8 MiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry3.pb", "entry4.pb"]
    assert compile_cache.prune_compile_cache(tmp_path, 1.0) == 0


def test_compiled_kernels_are_stored_and_reused_by_a_new_process(tmp_path):
    """TensorFlow honours the folder: a first process writes the compiled kernel, a second
    computes the same value and leaves the entry untouched (read, not compiled again); an entry
    cut short is replaced by a new compile instead of failing the kernel."""
    from vtn_tf.cli import compile_cache

    script = ("from vtn_tf.cli import common\n"
              "common.setup()\n"
              "import tensorflow as tf\n"
              "f = tf.function(lambda x: tf.sin(x) * 2.0 + 1.0, jit_compile=True)\n"
              "print(repr(float(f(tf.constant(0.5)))))\n")
    env = {**os.environ, "VTN_XLA_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_XLA_FLAGS", None)
    folder = pathlib.Path(compile_cache.compile_cache_folder(env))

    def run():
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not [p for p in folder.iterdir() if p.is_dir()]  # the workspace is gone
        entries = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        return float(done.stdout.strip().splitlines()[-1]), entries

    first, second = run(), run()
    assert first[0] == pytest.approx(np.sin(0.5) * 2 + 1, rel=1e-6) and second[0] == first[0]
    assert first[1] and all(name.endswith(".pb") for name in first[1])
    assert second[1] == first[1]
    for name in first[1]:
        path = folder / name
        path.write_bytes(path.read_bytes()[:-100])
    third = run()
    assert third[0] == first[0] and set(third[1]) == set(first[1])
    assert all(compile_cache.complete_entry(folder / name) for name in third[1])


def test_legacy_refine_flags_reach_the_settings_and_a_bad_window_is_a_user_error(tmp_path):
    """vtn-evaluate's ``--refine*`` flags override the preset's settings; a bad value is a user
    error. Run in a fresh interpreter: absl flags are process-global."""
    code = f"""
from absl import flags
from vtn_tf.cli import common
from vtn_tf.io import InputError
common.define_inference_flags()
common.define_refine_flags()
common.define_settings_flags()
flags.FLAGS(['x', '--refine', '20x10', '--refine_resolution', '0.5,1', '--refine_smoothness', '1.25',
             '--refine_folding', '3', '--refine_window', '7', '--refine_anneal', '--passes', '2'])
s = common.registration_settings({str(tmp_path)!r}, legacy=True, log=None)
r = s.refine
print(r.level_steps, r.factors, r.smoothness, r.folding, r.window, r.anneal, s.network.passes)
flags.FLAGS(['x', '--refine', '60', '--refine_window', '4'])
try:
    common.registration_settings({str(tmp_path)!r}, legacy=True, log=None)
except InputError as error:
    print('refused:', error)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(20, 10) (2, 1) 1.25 3.0 7 True 2" in out
    assert "refused: --set: ncc_window must be a positive odd number" in out


def test_preset_and_set_flags_resolve_the_run_s_register_section(tmp_path):
    """``--preset`` reads the run's config.json ``register`` section and ``--set`` wins; a value
    the settings refuse is a user error naming the file. Fresh interpreter: absl flags are global."""
    run = tmp_path / "run"
    run.mkdir()
    register = {"init": "none", "passes": 2, "refine": "40x12", "refine_resolution": [0.5, 1],
                "refine_smoothness": 1.25, "refine_anneal": True, "refine_folding": None}
    (run / "config.json").write_text(json.dumps({"model": {}, "register": register}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"register": {"init": "sideways"}}))
    code = f"""
from absl import flags
from vtn_tf.cli import common
from vtn_tf.io import InputError
common.define_settings_flags()
flags.FLAGS(['x', '--set', 'refine.smoothness=3'])
try:
    common.registration_settings({str(tmp_path / "bad")!r}, log=None)
except InputError as error:
    print('refused:', error)
s = common.registration_settings({str(run)!r}, log=print)
r = s.refine
print('settings', s.alignment.init, s.network.passes, r.level_steps, r.factors, r.smoothness, r.anneal, r.folding)
flags.FLAGS(['x', '--preset', 'fast'])
s = common.registration_settings({str(run)!r}, log=None)
print('fast', s.alignment.init, s.network.passes, s.refine.active)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # smoothness: the command line's; folding: null in the section, so the default
    assert "settings none 2 (40, 12) (2, 1) 3.0 True 3.0" in out
    assert "fast none 2 False" in out
    assert "preset accurate from" in out and "then --set refine.smoothness=3" in out
    assert f"refused: --preset accurate: {tmp_path}/bad/config.json: alignment.init must be one of" in out
