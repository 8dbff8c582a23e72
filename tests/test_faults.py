"""vtn_tf.io.faults: machine faults become one line and an exit status of their own."""

import errno

import pytest

from vtn_tf.io import faults


@pytest.mark.parametrize("code,filename,message,status,stops", [
    (errno.ENOSPC, None, "output folder {out}: no space left on device", faults.DISK_FULL, True),
    (errno.EDQUOT, "{out}/warped.nii.gz", "output folder {out}: disk quota exceeded", faults.DISK_FULL, True),
    (errno.EROFS, "{parent}/.s1.abcd.part/warped.nii.gz", "output folder {out}: read-only file system",
     faults.NOT_WRITABLE, False),
    (errno.EACCES, "{parent}/.s1.lock", "output folder {out}: permission denied", faults.NOT_WRITABLE, False),
    (errno.ENOENT, "/data/m.nii.gz", "input /data/m.nii.gz does not exist (removed while it was in use)",
     faults.BAD_INPUT, False),
    (errno.EACCES, "/data/m.nii.gz", "/data/m.nii.gz: permission denied", faults.BAD_INPUT, False),
])
def test_os_errors_become_one_line_faults(tmp_path, code, filename, message, status, stops):
    out, parent = tmp_path / "s1", tmp_path
    error = OSError(code, "strerror", filename.format(out=out, parent=parent) if filename else None)
    fault = faults.from_os_error(error, out)
    assert str(fault) == message.format(out=out)
    assert (fault.status, fault.stops_batch) == (status, stops)
    assert faults.status_of(fault) == status


def test_unknown_os_errors_keep_their_traceback(tmp_path):
    assert faults.from_os_error(OSError(errno.EIO, "Input/output error"), tmp_path) is None
    with pytest.raises(OSError, match="Input/output"):
        with faults.output_faults(tmp_path):
            raise OSError(errno.EIO, "Input/output error")
    with pytest.raises(faults.Fault, match="no space left on device"):
        with faults.output_faults(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_other_user_errors_exit_with_status_2():
    from vtn_tf.io import InputError

    assert faults.status_of(InputError("moving image m.nii.gz is 2-D")) == faults.BAD_INPUT
