"""One process per output folder: a second one refuses at once instead of interleaving files.

:func:`locked` takes an exclusive `flock` on ``.NAME.lock`` beside the output folder ``NAME``
(beside it, not in it, so that a folder that is never written is never created). The kernel
drops the lock when its process ends, however it ends: a lock file left by a killed process
(its pid no longer alive) is taken over at once, never waited for. The file holds the holder's
pid and host for the refusal message and is removed on release. Linux NFS clients emulate
`flock` with POSIX byte-range locks, so processes on several machines sharing a folder
exclude each other as well.
"""

import contextlib
import errno
import fcntl
import os
import pathlib
import socket

from vtn_tf.io.errors import InputError
from vtn_tf.io.faults import BUSY


class FolderBusy(InputError):
    """Another process holds the output folder's lock (exit status 5, `vtn_tf.io.faults`)."""

    status = BUSY


def lock_path(out):
    """The lock file of output folder ``out``: ``.NAME.lock`` beside it."""
    out = pathlib.Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


def _holder(path):
    try:
        text = path.read_text().split()
    except OSError:
        return "another process"
    return f"process {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


@contextlib.contextmanager
def locked(out):
    """Hold ``out``'s lock for the block.

    Raises:
      FolderBusy: another live process holds it (``output folder OUT is in use by process PID
        on HOST (lock file .OUT.lock)``).
      OSError: the lock file cannot be made (the folder above ``out`` is read-only or full).
    """
    path = lock_path(out)
    created = _missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield from _hold(out, path)
    finally:
        for folder in created:  # deepest first: folders made for the lock alone leave with it
            with contextlib.suppress(OSError):
                folder.rmdir()


def _missing_folders(folder):
    """The folders of ``folder``'s path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _hold(out, path):
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusy(f"output folder {out} is in use by {_holder(path)} (lock file {path})") from None
        try:
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:
                break  # the file we locked is still the lock file
        except FileNotFoundError:
            pass  # its holder removed it while releasing: lock the new one
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(descriptor)
