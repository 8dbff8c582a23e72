"""What every command-line tool shares: one-line errors and a non-zero exit, the shared flags,
and the cache of compiled kernels between runs."""

import atexit
import contextlib
import hashlib
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time

# ---- the compiled-kernel cache ---------------------------------------------------------------
# The resampling, affine search and refinement kernels are XLA-compiled per grid size: a fresh
# `vtn-register` process spends seconds compiling them. TensorFlow can keep the
# compiled executables on disk (TF_XLA_FLAGS=--tf_xla_persistent_cache_directory); the tools
# turn that on in a folder keyed by the TensorFlow version and this CPU's instruction set
# (an executable built for one CPU may not run on another, e.g. on a cluster sharing $HOME).
COMPILE_CACHE_ENV = "VTN_XLA_CACHE"  # a folder, or "off"; default: $XDG_CACHE_HOME/vtn-tf/xla
COMPILE_CACHE_MB_ENV = "VTN_XLA_CACHE_MB"  # size bound; the oldest entries go first
COMPILE_CACHE_MB = 1024
_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def _machine_key():
    """A short key of this CPU's instruction set (the ``flags`` of /proc/cpuinfo) and architecture."""
    features = ""
    try:
        with open("/proc/cpuinfo") as info:
            features = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    text = f"{platform.machine()} {platform.processor()} {' '.join(sorted(features.split(':')[-1].split()))}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def compile_cache_folder(environ=None):
    """The folder the XLA kernel cache goes in, or None when off.

    ``VTN_XLA_CACHE=off`` (or ``0``, or empty) turns it off; a path puts it there; by default
    ``$XDG_CACHE_HOME/vtn-tf/xla`` (``~/.cache/vtn-tf/xla``). Either way a sub-folder named
    by the TensorFlow version and :func:`_machine_key` holds the entries. None also when
    ``TF_XLA_FLAGS`` already names a cache folder (the user's choice stands).
    """
    environ = os.environ if environ is None else environ
    if _CACHE_FLAG in environ.get("TF_XLA_FLAGS", ""):
        return None
    root = environ.get(COMPILE_CACHE_ENV)
    if root is not None and root.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if root is None:
        base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "vtn-tf", "xla")
    try:
        from importlib.metadata import version

        tensorflow = version("tensorflow")
    except Exception:  # noqa: BLE001 - any metadata trouble: key the folder without it
        tensorflow = "unknown"
    return os.path.join(os.path.expanduser(root), f"tf{tensorflow}-{_machine_key()}")


def prune_compile_cache(folder, limit_mb):
    """Delete the oldest files of ``folder`` (by modification time) until it holds at most
    ``limit_mb`` MiB; returns the number deleted. Files that vanish meanwhile are skipped."""
    entries = []
    with os.scandir(folder) as listing:
        for entry in listing:
            try:
                if entry.is_file():
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
            except OSError:
                continue
    total, limit, deleted = sum(size for _, size, _ in entries), limit_mb * (1 << 20), 0
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        try:
            os.remove(path)
        except OSError:
            continue
        total, deleted = total - size, deleted + 1
    return deleted


def complete_entry(path):
    """Whether ``path`` is a whole cache entry: TensorFlow's ``XlaSerializedCacheEntry``
    protocol buffer, read field by field (its key 1, HLO 2 and executable 3, each
    length-delimited) to exactly the file's end. A file cut short (a process killed while
    writing it, a full disk) is not: TensorFlow would fail every later compile of that kernel
    on it instead of compiling afresh."""
    def varint(data, pos):
        value = shift = 0
        while pos < len(data):
            byte = data[pos]
            value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
            if not byte & 0x80:
                return value, pos
        return None, pos

    fields = set()
    try:
        with open(path, "rb") as entry:
            size, pos = os.fstat(entry.fileno()).st_size, 0
            while pos < size:
                entry.seek(pos)
                head = entry.read(20)
                tag, at = varint(head, 0)
                if tag is None or tag & 7 != 2:
                    return False
                length, at = varint(head, at)
                if length is None:
                    return False
                fields.add(tag >> 3)
                pos += at + length
    except OSError:
        return False
    return pos == size and {1, 2, 3} <= fields


_WORKSPACE = ".process-"  # a process's own folder inside the cache: <host>-<pid>-<random>
_WORKSPACE_ENV = "VTN_XLA_WORKSPACE"  # set by configure_compile_cache; inherited by child processes


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_stale_workspaces(folder, host, days=7):
    """Delete the workspaces of processes that are gone: this host's by their pid, other
    hosts' (a shared home folder) after ``days`` without change."""
    for entry in os.scandir(folder):
        if not (entry.name.startswith(_WORKSPACE) and entry.is_dir(follow_symlinks=False)):
            continue
        owner, pid, _ = (entry.name[len(_WORKSPACE):].rsplit("-", 2) + ["", ""])[:3]
        if owner == host:
            stale = not (pid.isdigit() and _alive(int(pid)))
        else:
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > days * 86400
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)


def _publish(workspace, folder):
    """At exit: move the entries this process compiled (complete ones only) from its
    workspace into the shared folder (an atomic rename each), then delete the workspace."""
    try:
        for entry in os.scandir(workspace):
            if entry.is_symlink() or not entry.name.endswith(".pb"):
                continue
            if entry.stat().st_nlink == 1 and complete_entry(entry.path):  # new here, not linked in
                os.replace(entry.path, os.path.join(folder, entry.name))
    except OSError:
        pass
    shutil.rmtree(workspace, ignore_errors=True)


def configure_compile_cache(environ=None):
    """Point TensorFlow's XLA kernel cache at :func:`compile_cache_folder` (before TensorFlow
    first compiles); returns the folder TensorFlow reads and writes, or None when off.

    Each process works in a workspace of its own inside the folder: the complete shared
    entries hard-linked in at start, its new entries renamed into the shared folder when it
    exits, so no process reads an entry another is still writing and a process killed
    mid-write leaves nothing behind. Entries that are not complete are deleted; the folder is
    kept within ``VTN_XLA_CACHE_MB``. A folder that cannot be used leaves the cache off."""
    environ = os.environ if environ is None else environ
    inherited = environ.pop(_WORKSPACE_ENV, None)  # a parent tool's workspace: never shared with it
    if inherited:
        flags = environ.get("TF_XLA_FLAGS", "").split()
        environ["TF_XLA_FLAGS"] = " ".join(f for f in flags if f != f"{_CACHE_FLAG}={inherited}")
    folder = compile_cache_folder(environ)
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        limit = float(environ.get(COMPILE_CACHE_MB_ENV, COMPILE_CACHE_MB))
        host = socket.gethostname().replace("-", "_") or "host"
        _remove_stale_workspaces(folder, host)
        prune_compile_cache(folder, limit)
        workspace = tempfile.mkdtemp(prefix=f"{_WORKSPACE}{host}-{os.getpid()}-", dir=folder)
        for entry in os.scandir(folder):
            if not entry.name.endswith(".pb") or not entry.is_file(follow_symlinks=False):
                continue
            if not complete_entry(entry.path):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
                continue
            target = os.path.join(workspace, entry.name)
            try:
                os.link(entry.path, target)
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
            except OSError:  # a file system without hard links
                with contextlib.suppress(OSError):
                    os.symlink(entry.path, target)
    except (OSError, ValueError):
        return None
    atexit.register(_publish, workspace, folder)
    environ["TF_XLA_FLAGS"] = f"{environ.get('TF_XLA_FLAGS', '')} {_CACHE_FLAG}={workspace}".strip()
    environ[_WORKSPACE_ENV] = workspace  # so that a tool this process starts makes its own
    # Loading a cached kernel logs spurious C++ errors (a text-format parse attempt, tuning
    # flags read as CPU features); errors a user can act on reach Python as exceptions.
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return workspace


configure_compile_cache()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vtn_tf.config import ConfigError
from vtn_tf.io import InputError, error_line
from vtn_tf.registration import expected_retracing

# Errors a user can fix: the library's InputError (a file, flag or setting that cannot be
# used) and ConfigError, and the FileNotFoundError / FileExistsError / PermissionError it
# raises about user files. Anything else (a bare ValueError, KeyError or OSError) is a bug
# and keeps its traceback.
USER_ERRORS = (InputError, ConfigError, FileNotFoundError, FileExistsError, PermissionError)


logging.getLogger("tensorflow").addFilter(expected_retracing)


def define_passes_flag():
    """``--passes N``: test-time recursion of the cascade (`vtn_tf.model.VTN.register`)."""
    from absl import flags

    if "passes" in flags.FLAGS:  # already defined by another tool imported in this process
        return
    flags.DEFINE_integer("passes", 1, "test-time recursion: run the cascade this many times, each on the "
                         "previous pass's warped image, composing the flows (1 = the paper; 0 = do not run the "
                         "network: the initial alignment and --refine alone, the optimiser without the network)",
                         lower_bound=0)


def define_precision_flag():
    """``--precision``: the network's compute type at inference (`vtn_tf.checkpoints.PRECISIONS`)."""
    from absl import flags

    if "precision" in flags.FLAGS:
        return
    flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"],
                      "the network's compute type (weights, flows and warps stay float32): "
                      "bfloat16 is faster on CPUs with AVX512_BF16 or AMX, float16 on GPUs")


def define_inference_flags():
    """The flags of every tool that runs a trained model: ``--passes`` and ``--precision``."""
    define_passes_flag()
    define_precision_flag()


def define_refine_flags():
    """``--init`` and the ``--refine*`` flags (`vtn_tf.alignment`, `vtn_tf.refine`)."""
    from absl import flags

    from vtn_tf.registration import INIT_STEPS

    if "refine" in flags.FLAGS:
        return
    flags.DEFINE_enum("init", "best", ["best", "moments", "com", "none"],
                      "initial world-space alignment before the network: moments = centres of mass and "
                      "principal axes, com = centres of mass only, best = whichever of the two correlates "
                      "better on the network grid, none = trust the headers")
    flags.DEFINE_integer("init_steps", INIT_STEPS, "steps of the affine search after --init (global correlation "
                         "on the network grid, as the ANTs and elastix affine stages; 0 = the initialiser alone; "
                         "not run with --init none)",
                         lower_bound=0)
    flags.DEFINE_string("refine", "0", "instance optimisation: Adam steps on the pair after the network, on "
                        "each level of --refine_resolution, or one count per level, coarse to fine, as ANTs' "
                        "convergence schedules (e.g. 60x60x60x20; with auto levels the last counts go to the "
                        "finest levels); 0 = off, 60 is the measured choice")
    flags.DEFINE_float("refine_seconds", None, "time budget for --refine in seconds (stops at whichever "
                       "of steps and seconds comes first)")
    flags.DEFINE_list("refine_resolution", ["auto"], "refinement grid as a fraction of the fixed grid per axis, or "
                      "several, coarse to fine (e.g. 0.25,0.33,0.5: --refine steps on each); auto = 1.5, 1 and "
                      "0.75 times the network grid's spacing, never finer than the fixed grid")
    flags.DEFINE_float("refine_rate", 0.3, "Adam learning rate, voxels of the fixed grid per step")
    flags.DEFINE_boolean("refine_anneal", False, "lower Adam's rate on each level along a half cosine, from "
                         "--refine_rate at its first step towards 0 at its last (Adam's steps keep their size "
                         "near the optimum; annealed, the last steps settle instead of jittering the field)")
    flags.DEFINE_float("refine_smoothness", 2.0, "weight of the smoothness term during refinement")
    flags.DEFINE_float("refine_folding", 3.0, "weight of the penalty on negative Jacobian determinants during "
                       "refinement (0 = none)")
    flags.DEFINE_integer("refine_network", 0, "fine-tune the network's weights on the pair for this many Adam "
                         "steps (its training loss, on the network grid) before taking its field; the weights "
                         "return to the trained ones for the next pair (0 = off)", lower_bound=0)
    flags.DEFINE_float("refine_network_rate", 1e-4, "Adam learning rate of --refine_network")
    flags.DEFINE_enum("refine_similarity", "ncc", ["ncc", "cc"], "refinement similarity: local (--refine_window^3 "
                      "windows) or global correlation")
    flags.DEFINE_boolean("recommended", False, "take the test-time settings the model's config recommends (the "
                         "'register' section of its run's config.json: initial alignment, passes and refinement "
                         "schedule chosen on validation pairs) for every one of those flags not given here")
    flags.DEFINE_integer("refine_window", 5, "side of the local correlation's cubes in voxels of each refinement "
                         "level (odd; ANTs' CC radius r is a side of 2r + 1)", lower_bound=1)


def apply_recommended(model_dir, log=print):
    """``--recommended``: set the flags that the ``register`` section of ``model_dir``'s
    ``config.json`` names (`vtn_tf.config`) and the command line did not give.

    Returns the settings taken, as command-line words. Raises :class:`vtn_tf.io.InputError`
    naming the file when the run has no such section or a value the flag refuses."""
    import json
    import pathlib

    from absl import flags

    from vtn_tf.io import InputError

    path = pathlib.Path(model_dir or "") / "config.json"
    try:
        section = json.loads(path.read_text()).get("register") or {}
    except (OSError, ValueError) as error:
        raise InputError(f"--recommended reads {path}: {error}") from None
    chosen = {name: value for name, value in section.items() if value is not None}
    if not chosen:
        raise InputError(f"--recommended: {path} recommends no test-time settings (its config has no 'register' "
                         "section, or only nulls); give the flags, or add the section (docs/usage.md)")
    taken = []
    for name, value in chosen.items():
        if name not in flags.FLAGS:
            raise InputError(f"--recommended: {path} names {name!r}, which is not a flag of this tool")
        flag = flags.FLAGS[name]
        if flag.present:  # the command line wins
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        try:
            flag.parse(text)
        except (flags.IllegalFlagValueError, ValueError) as error:
            raise InputError(f"--recommended: {path}: register.{name} = {value!r}: {error}") from None
        taken.append(f"--{name}" if value is True else f"--no{name}" if value is False else f"--{name} {text}")
    log(f"recommended by {path}: {' '.join(taken) if taken else 'nothing the command line does not set'}")
    return taken


def refine_steps(text):
    """``--refine``'s steps: ``"60"`` -> 60 (on every level), ``"60x60x20"`` -> (60, 60, 20)."""
    from vtn_tf.io import InputError

    try:
        counts = tuple(int(part) for part in str(text).replace(",", "x").split("x"))
    except ValueError:
        raise InputError(f"--refine takes a step count or counts per level such as 60x60x20; got {text!r}") from None
    if any(n < 0 for n in counts):
        raise InputError(f"--refine steps must be >= 0; got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def refine_settings():
    """The :class:`vtn_tf.refine.RefineSettings` of the flags, or None without ``--refine``."""
    from absl import flags

    values = flags.FLAGS
    steps = refine_steps(values.refine)
    if not any(steps if isinstance(steps, tuple) else (steps,)) and not values.refine_network:
        return None
    from vtn_tf.io import InputError
    from vtn_tf.refine import RefineSettings

    try:
        try:
            resolution = "auto" if list(values.refine_resolution) == ["auto"] else tuple(
                float(r) for r in values.refine_resolution)
        except ValueError:
            raise ValueError(f"--refine_resolution takes numbers; got {','.join(values.refine_resolution)}") from None
        return RefineSettings(steps=steps, seconds=values.refine_seconds, learning_rate=values.refine_rate,
                              similarity=values.refine_similarity, ncc_window=values.refine_window,
                              smoothness=values.refine_smoothness,
                              folding=values.refine_folding, resolution=resolution,
                              network_steps=values.refine_network, network_rate=values.refine_network_rate,
                              anneal=values.refine_anneal)
    except ValueError as error:
        raise InputError(f"--refine options: {error}") from None


@contextlib.contextmanager
def user_errors(tool, verbose=False):
    """Turn user errors into ``tool: error: message`` on stderr and exit status 2.

    With ``verbose`` the traceback is kept (re-raised), unfiltered by Keras."""
    if verbose:
        import keras

        keras.config.disable_traceback_filtering()
    try:
        yield
    except USER_ERRORS as error:
        if verbose:
            raise
        print(f"{tool}: error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)
