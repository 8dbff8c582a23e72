"""Outputs that appear whole or not at all: checks before any work, atomic file writes, and
staging folders moved into place together."""

import contextlib
import os
import pathlib
import shutil
import tempfile

from vtn_tf.io.errors import InputError, OutputNotWritable


def _refuse_existing(path):
    raise InputError(f"output {path} already exists; pass --overwrite to replace it")


def _check_writable(folder):
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "permission denied"
        raise OutputNotWritable(f"output folder {folder} is not writable ({why})")


def check_output_file(path, overwrite=False):
    """Check, before any work, that a file can be written at ``path``.

    Args:
      path: the file to write.
      overwrite: allow replacing an existing file.

    Returns:
      ``(path, folder)``: ``path`` as a string and its folder's absolute path.

    Raises:
      InputError: ``path`` is a folder, exists without ``overwrite``, or its folder is
        missing or not writable.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"output {path} is a folder; a file name is required")
    if os.path.lexists(path) and not overwrite:
        _refuse_existing(path)
    if not os.path.isdir(folder):
        raise InputError(f"output folder {folder} does not exist")
    _check_writable(folder)
    return path, folder


def check_output_folder(out, overwrite=False, names=()):
    """Check, before any work, that the output folder ``out`` can be written.

    Missing folders (``out`` and those above it) count as creatable when the nearest
    existing one is a writable folder.

    Args:
      out: the output folder.
      overwrite: allow replacing what exists.
      names: the entries to be written inside ``out``. With none, ``out`` as a whole is the
        output (it is replaced); with some, only these entries are (other files stay).

    Returns:
      ``out`` as a `pathlib.Path`.

    Raises:
      InputError: ``out`` or a folder above it is a file; without ``overwrite``, ``out``
        exists (no ``names``) or one of ``names`` exists in it; the folder written into
        (``out`` when it exists and ``names`` are given, else the nearest existing folder
        above ``out``) is not writable.
    """
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; an output folder is required")
    if names:
        existing = [out / n for n in names if os.path.lexists(out / n)]
    else:
        existing = [out] if out.exists() else []
    if existing and not overwrite:
        _refuse_existing(existing[0])
    start = out.absolute() if names and out.exists() else out.absolute().parent
    parent = next(p for p in (start, *start.parents) if p.exists())
    if not parent.is_dir():
        raise InputError(f"output {out} is inside {parent}, which is a file; a folder is required")
    _check_writable(parent)
    return out


def _staging(folder, out, suffix):
    return pathlib.Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}.", suffix=suffix))


@contextlib.contextmanager
def staged_folder(out, replace=False):
    """Write a folder's contents elsewhere first, and into ``out`` only once all is written.

    The staging folder ``.{name}.XXXX.part`` is made beside ``out`` (inside ``out`` when it
    exists and is merged into, so the moves stay on one file system). On normal exit:

    * ``out`` missing: the staging folder is renamed to ``out`` (missing folders above are
      created first).
    * ``out`` exists, ``replace`` false: each entry of the staging folder is moved into
      ``out`` with `os.replace`; other entries of ``out`` stay (a folder entry replaces only
      an absent or empty one).
    * ``out`` exists, ``replace`` true: ``out`` is moved aside, the staging folder renamed to
      ``out``, then the old one removed (put back if the rename fails).

    If the block raises, the staging folder is removed and ``out`` is left untouched. The
    output checks are the caller's (:func:`check_output_folder`).

    Args:
      out: the output folder.
      replace: replace ``out`` as a whole instead of merging into it.

    Yields:
      The staging folder, a `pathlib.Path`, empty.
    """
    out = pathlib.Path(out)
    merge = out.exists() and not replace
    if not merge:
        out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out if merge else out.parent, out, ".part")
    try:
        yield staging
        if merge:
            for entry in os.listdir(staging):
                os.replace(staging / entry, out / entry)
            return
        os.chmod(staging, 0o755)
        if not out.exists():
            os.replace(staging, out)
            return
        old = _staging(out.parent, out, ".old")
        try:
            os.replace(out, old / "previous")
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old / "previous", out)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path, write, overwrite, suffix=""):
    """Call ``write(temporary_path)`` then rename it onto ``path`` (same folder)."""
    path, folder = check_output_file(path, overwrite)
    handle, temporary = tempfile.mkstemp(
        dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".part" + suffix)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def atomic_write_bytes(path, payload, overwrite=False):
    """Write ``payload`` (bytes) to ``path`` via a temporary file and a rename.

    Raises:
      InputError: as :func:`check_output_file`, before anything is written.
    """
    def write(temporary):
        with open(temporary, "wb") as stream:
            stream.write(payload)
    return atomic_write(path, write, overwrite)


def atomic_write_text(path, text, overwrite=False):
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and a rename (as
    :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)
