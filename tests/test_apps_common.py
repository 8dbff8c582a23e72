"""vtn_tf.apps.common: which errors become one-line messages (exit 2) and which keep their traceback."""

import errno

import pytest

from vtn_tf.apps.common import user_errors
from vtn_tf.config import ConfigError
from vtn_tf.io import InputError


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


def test_refine_steps_take_a_count_or_one_per_level():
    from vtn_tf.apps.common import refine_steps

    assert refine_steps("60") == 60 and refine_steps("0") == 0
    assert refine_steps("60x60x60x20") == (60, 60, 60, 20) and refine_steps("100,50") == (100, 50)
    for text in ("ten", "60x", "-5", "60x-1"):
        with pytest.raises(InputError, match="--refine"):
            refine_steps(text)
