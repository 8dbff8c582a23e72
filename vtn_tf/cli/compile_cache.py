"""The cache of compiled kernels between runs.

The resampling, affine search and refinement kernels are XLA-compiled per grid size: a fresh
`vtn-register` process spends seconds compiling them. TensorFlow can keep the compiled
executables on disk (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``); the commands turn
that on (:func:`configure_compile_cache`, from their `main`) in a folder keyed by the TensorFlow
version and this CPU's instruction set (an executable built for one CPU may not run on another,
e.g. on a cluster sharing $HOME).
"""

import atexit
import contextlib
import hashlib
import os
import platform
import shutil
import socket
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


def machine_key():
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
    by the TensorFlow version and :func:`machine_key` holds the entries. None also when
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
    return os.path.join(os.path.expanduser(root), f"tf{tensorflow}-{machine_key()}")


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


def publish(workspace, folder):
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
    atexit.register(publish, workspace, folder)
    environ["TF_XLA_FLAGS"] = f"{environ.get('TF_XLA_FLAGS', '')} {_CACHE_FLAG}={workspace}".strip()
    environ[_WORKSPACE_ENV] = workspace  # so that a tool this process starts makes its own
    # Loading a cached kernel logs spurious C++ errors (a text-format parse attempt, tuning
    # flags read as CPU features); errors a user can act on reach Python as exceptions.
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return workspace
