"""The error a user can fix: a file, flag or setting that cannot be used, in one line."""


class InputError(ValueError):
    """A user-supplied file or setting is unusable; the message says which and why."""


# The errors a user can fix, which the commands turn into one line and a non-zero exit: the
# library's InputError (a file, flag or setting that cannot be used; the training config's
# ConfigError is one), and the FileNotFoundError / FileExistsError / PermissionError it raises
# about user files. Anything else (a bare ValueError, KeyError or OSError) is a bug and keeps
# its traceback.
USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, PermissionError)


class OutputNotWritable(InputError):
    """An output folder that exists but cannot be written (read-only file system, permissions)."""


def error_line(error):
    """The first non-blank line of ``error``'s message, or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
