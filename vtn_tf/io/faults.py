"""Faults of the machine, not of the input: a full disk, a read-only or forbidden output
folder, an input that vanished while in use. Each becomes one line naming the path and the
problem, and an exit status of its own:

====  ==============================================================================
  0   every pair registered (or skipped as already complete)
  1   batch: some pairs failed (each reported on its line); the others are written
  2   bad input or settings: a file, the model, the pairs file, a flag (one line)
  3   an output folder cannot be written: read-only file system, permission denied
  4   no space left on the device (or the disk quota is reached); a batch stops there
  5   the output folder is in use by another process (its lock, `vtn_tf.io.folder_lock`)
====  ==============================================================================

A batch goes on after a status-2, 3 or 5 pair (it counts as failed) and stops at a full
disk: every following pair would fail the same way, after minutes of work each.
"""

import contextlib
import errno
import os

from vtn_tf.io.errors import InputError, OutputNotWritable

OK, PAIRS_FAILED, BAD_INPUT, NOT_WRITABLE, DISK_FULL, BUSY = 0, 1, 2, 3, 4, 5
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


class Fault(InputError):
    """A fault with its exit status; ``stops_batch``: the next pairs would fail alike."""

    def __init__(self, message, status, stops_batch=False):
        super().__init__(message)
        self.status = status
        self.stops_batch = stops_batch


def _inside(path, folder):
    """Whether ``path`` is ``folder``, in it, or in one of its staging folders or its lock file
    (``.NAME.XXXX.part``, ``.NAME.lock`` beside it)."""
    parent, name = os.path.split(os.path.abspath(folder))
    relative = os.path.relpath(os.path.abspath(path), parent)
    first = relative.split(os.sep)[0]
    return first == name or first.startswith(f".{name}.")


def from_os_error(error, out):
    """The :class:`Fault` for an OSError met while registering into output folder ``out``,
    or None for one this module does not know (let it propagate with its traceback).

    An error naming a file outside ``out`` is an input's (a vanished input: status 2); one
    naming no file (a full disk while a stream is flushed) is the output folder's.
    """
    filename = getattr(error, "filename", None)
    code = error.errno
    outside = filename is not None and not _inside(os.fspath(filename), out)
    if code == errno.ENOENT and outside:
        return Fault(f"input {filename} does not exist (removed while it was in use)", BAD_INPUT)
    if code in _DISK_FULL:
        return Fault(f"output folder {out}: {_DISK_FULL[code]}", DISK_FULL, stops_batch=True)
    if code in _NOT_WRITABLE:
        if outside:
            return Fault(f"{filename}: {_NOT_WRITABLE[code]}", BAD_INPUT)
        return Fault(f"output folder {out}: {_NOT_WRITABLE[code]}", NOT_WRITABLE)
    return None


@contextlib.contextmanager
def output_faults(out):
    """Turn the OSErrors :func:`from_os_error` knows into :class:`Fault` s for the block."""
    try:
        yield
    except OSError as error:
        fault = from_os_error(error, out)
        if fault is None:
            raise
        raise fault from None


def status_of(error):
    """The exit status of a user error: its ``status`` (a :class:`Fault`, a busy folder), 3 for
    an output folder found not writable before any work, else 2."""
    if isinstance(error, OutputNotWritable):
        return NOT_WRITABLE
    return getattr(error, "status", BAD_INPUT)
