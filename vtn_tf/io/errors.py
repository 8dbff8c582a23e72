"""The error a user can fix: a file, flag or setting that cannot be used, in one line."""


class InputError(ValueError):
    """A user-supplied file or setting is unusable; the message says which and why."""


class OutputNotWritable(InputError):
    """An output folder that exists but cannot be written (read-only file system, permissions)."""


def error_line(error):
    """The first non-blank line of ``error``'s message, or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
