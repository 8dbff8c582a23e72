"""A warm registration server on this machine: ``vtn-register --serve``.

A fresh ``vtn-register`` process spends seconds before its work: Python and TensorFlow start,
the model is built and restored, the network traced, the kernels compiled (or read from the
compiled-kernel cache). A server pays that once: it keeps one model loaded, registers the pairs
sent to it one at a time, and each later ``vtn-register --model SAME_RUN ...`` call hands its
pair to it instead of loading the model (the client imports no TensorFlow). The outputs are
those of a call in a fresh process with the same settings: the server runs the same function
(`vtn_tf.registration.batch.register_call`), under the output folder's lock.

Local only. The server listens on a Unix-domain socket (no network port) in a folder only its
user can open, ``$XDG_RUNTIME_DIR/vtn-tf`` or ``/tmp/vtn-tf-<uid>`` (mode 0700, refused when
anyone else owns it or may open it), named by a hash of the model folder's real path; it also
refuses a connection from another user (``SO_PEERCRED``). The socket goes when the server
stops (Ctrl-C, SIGTERM); one left by a killed server is replaced by the next one.

Protocol (one connection per pair): the client sends one JSON line :func:`request` describes;
the server answers with JSON lines ``{"line": text, "stream": "out" | "err"}`` (the call's
messages), then ``{"status": n}``, the exit status a fresh process would have had
(`vtn_tf.io.faults`). A server whose model folder has a newer checkpoint than the one it
loaded reloads it before the next pair.

From Python::

    from vtn_tf.serving import warm
    status = warm.request("runs/brain", {"fixed": "f.nii.gz", "moving": "m.nii.gz", "out": "out"})
    # None: no server for that model (register in-process, e.g. vtn_tf.registration.pipeline)
"""

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import tempfile

from vtn_tf.io.errors import InputError

PROTOCOL = 1
# The request fields, with their defaults: the arguments of one vtn-register call.
FIELDS: dict[str, object] = {"fixed": None, "moving": None, "out": None, "moving_labels": [], "fixed_labels": [],
          "inverse": False, "overwrite": False, "preset": "accurate", "set": []}
PATHS = ("fixed", "moving", "out", "moving_labels", "fixed_labels")


class ServerError(InputError):
    """The socket folder is unsafe, or a server for the model already runs."""


# ----- where a model's server listens ----------------------------------------------------------
def socket_folder(environ=None):
    """The folder of this user's server sockets (created mode 0700). ServerError when it exists
    but belongs to someone else or others may open it."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR")
    folder = os.path.join(runtime, "vtn-tf") if runtime else os.path.join(tempfile.gettempdir(),
                                                                          f"vtn-tf-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServerError(f"{folder} is not a private folder of this user (owner, mode "
                          f"{stat.filemode(info.st_mode)}): no server socket is put or looked for there")
    return folder


def socket_path(run_dir, environ=None):
    """The socket of the server of the model in ``run_dir`` (by its real path)."""
    key = hashlib.sha256(os.path.realpath(os.fspath(run_dir)).encode()).hexdigest()[:20]
    return os.path.join(socket_folder(environ), f"{key}.sock")


def _connect(path):
    """A connected socket, or None when no server listens at ``path``."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        client.close()
        return None
    return client


# ----- the client -----------------------------------------------------------------------------
def request(run_dir, call, on_line=None, environ=None):
    """Hand one registration to the server of ``run_dir``'s model.

    Args:
      run_dir: the model's run directory.
      call: the call's arguments, keys of :data:`FIELDS` (``fixed``, ``moving``, ``out``
        required; relative paths are taken from this process's working folder).
      on_line: receives ``(text, stream)`` for each message (``stream`` "out" or "err");
        default: printed to stdout / stderr.
    Returns:
      the exit status of the call (`vtn_tf.io.faults`), or None when no server serves
      ``run_dir`` (nothing was done).
    """
    try:
        path = socket_path(run_dir, environ)
    except (ServerError, OSError):
        return None
    client = _connect(path)
    if client is None:
        return None
    on_line = on_line or _print_line
    message = {**FIELDS, **call, "protocol": PROTOCOL}
    for name in PATHS:
        value = message[name]
        message[name] = [os.path.abspath(p) for p in value] if isinstance(value, list) else os.path.abspath(value)
    with client, client.makefile("rwb") as stream:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()
        for raw in stream:
            answer = json.loads(raw)
            if "status" in answer:
                return int(answer["status"])
            on_line(answer["line"], answer.get("stream", "out"))
    on_line(f"vtn-register: error: the server at {path} stopped before the registration ended", "err")
    return 1


def _print_line(text, stream):
    print(text, file=sys.stderr if stream == "err" else sys.stdout, flush=True)


# ----- the server -----------------------------------------------------------------------------
class _Reply:
    """Sends a call's messages to its client; a client gone leaves the call to finish alone."""

    def __init__(self, stream):
        self.stream, self.open = stream, True

    def send(self, **message):
        if not self.open:
            return
        try:
            self.stream.write(json.dumps(message).encode() + b"\n")
            self.stream.flush()
        except OSError:
            self.open = False

    def out(self, text):
        self.send(line=str(text), stream="out")

    def err(self, text):
        self.send(line=str(text), stream="err")


class Server:
    """The model of ``run_dir`` loaded once, registering the calls sent to :meth:`serve_forever`.

    Args:
      run_dir: a vtn-train run directory.
      log: receives the server's own lines (start, each call, stop).
    """

    def __init__(self, run_dir, log=print):
        self.run_dir, self.log = os.fspath(run_dir), log
        self.registrars = {}  # network precision -> a Registrar holding the model built in it

    def registrar(self, settings, reply):
        """A registrar for ``settings``: the loaded model (reloaded when the run directory has a
        newer checkpoint), with these settings and logging to ``reply``."""
        from vtn_tf.registration import pipeline

        precision = settings.network.precision
        loaded = self.registrars.get(precision)
        if loaded is not None and _latest_checkpoint(self.run_dir) != loaded.checkpoint:
            reply.err(f"{self.run_dir} has a newer checkpoint than {loaded.checkpoint}: loading it")
            loaded = None
        if loaded is None:
            loaded = self.registrars[precision] = pipeline.Registrar(self.run_dir, settings, reply.out)
        return loaded.with_settings(settings, reply.out)

    def handle(self, call, reply):
        """Register one call (a :func:`request` message); returns its exit status."""
        import dataclasses

        from vtn_tf.io import error_line, faults
        from vtn_tf.io.errors import USER_ERRORS
        from vtn_tf.registration import batch
        from vtn_tf.registration import settings as settings_lib

        try:
            if call.get("protocol") != PROTOCOL:
                raise ValueError(f"protocol {call.get('protocol')!r}; this server speaks {PROTOCOL}")
            call = {**FIELDS, **{k: v for k, v in call.items() if k in FIELDS}}
            if not all(call[name] for name in ("fixed", "moving", "out")):
                raise ValueError("a call needs fixed, moving and out")
            settings = settings_lib.resolve(self.run_dir, call["preset"], call["set"], reply.err)
            if call["inverse"]:
                settings = dataclasses.replace(settings, output=dataclasses.replace(settings.output, inverse=True))
            batch.register_call(lambda: self.registrar(settings, reply), settings, call["fixed"], call["moving"],
                                call["out"], call["moving_labels"], call["fixed_labels"], call["overwrite"])
            return faults.OK
        except USER_ERRORS as error:
            reply.err(f"vtn-register: error: {error_line(error)}")
            return faults.status_of(error)
        except Exception as error:  # noqa: BLE001 - a bug in one call must not stop the server
            reply.err(f"vtn-register: internal error in the server: {type(error).__name__}: {error_line(error)}")
            return faults.PAIRS_FAILED

    def warm_up(self):
        """Load the model for the default preset and trace its network once (on zeros), so that
        the first call finds it ready."""
        import io as byte_io

        import numpy as np

        from vtn_tf.registration import network
        from vtn_tf.registration import settings as settings_lib

        settings = settings_lib.resolve(self.run_dir, settings_lib.DEFAULT_PRESET, (), lambda *_: None)
        registrar = self.registrar(settings, _Reply(byte_io.BytesIO()))
        if settings.network.passes > 0:
            zeros = np.zeros((1, *registrar.network_shape, 1), np.float32)
            network.network_outputs(registrar.model, zeros, zeros, settings.network.passes)

    def serve_forever(self, environ=None):
        """Listen until Ctrl-C or SIGTERM; the socket is removed on the way out. ServerError when
        a server for this model already listens."""
        path = socket_path(self.run_dir, environ)
        running = _connect(path)
        if running is not None:
            running.close()
            raise ServerError(f"a server for {self.run_dir} already listens at {path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a server that was killed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(16)
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            self.warm_up()
            self.log(f"serving {self.run_dir} at {path} (pid {os.getpid()}): `vtn-register --model {self.run_dir} "
                     "FIXED MOVING --out OUT` now registers here, one pair at a time; Ctrl-C stops")
            while True:
                connection, _ = listener.accept()
                with connection:
                    try:
                        self.answer(connection)
                    except OSError as error:  # a client gone mid-call: the next one is served
                        self.log(f"a client left: {error}")
        except KeyboardInterrupt:
            self.log("server stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def answer(self, connection):
        """Read one call from ``connection``, register it, send the status."""
        if not _same_user(connection):
            return
        with connection.makefile("rwb") as stream:
            reply = _Reply(stream)
            try:
                call = json.loads(stream.readline() or b"null")
            except ValueError:
                call = None
            if not isinstance(call, dict):
                reply.err("vtn-register: error: the server received no call (one JSON line)")
                reply.send(status=2)
                return
            status = self.handle(call, reply)
            self.log(f"{call.get('moving')} -> {call.get('fixed')}: status {status}")
            reply.send(status=status)


def _stop(signum, frame):
    raise KeyboardInterrupt


def _same_user(connection):
    """Whether the peer runs as this user (Linux ``SO_PEERCRED``; elsewhere the private socket
    folder is the guard)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid == os.getuid()


def _latest_checkpoint(run_dir):
    """The path of the newest checkpoint of ``run_dir`` as its ``checkpoint`` file names it."""
    import tensorflow as tf

    return tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
