"""One ``vtn-register`` call in a fresh process, its parts timed (run by bench_register.py).

The same steps as `vtn_tf.cli.register` in the same order (its set-up, then the registration
code, the settings, the model, one pair read, registered and written), then the same pair again
in this process: the second pass is the work alone, so first - second is what tracing and
compiling cost on the first. Prints one JSON line of wall-clock stamps (``time.time()``, to
be compared with the parent's clock) and seconds per part.

Usage: python call_parts.py MODEL FIXED MOVING LABELS OUT PRESET [section.field=value ...]
"""

import time

began = time.time()
import json  # noqa: E402 - the stamp above is the process's first instruction
import os  # noqa: E402
import sys  # noqa: E402


def main():
    model, fixed, moving, labels, out, preset, *overrides = sys.argv[1:]
    from vtn_tf.cli.common import setup

    setup()
    stamps = {"began": began}
    from vtn_tf.registration import pipeline, settings  # loads TensorFlow, as the command does here

    stamps["imported"] = time.time()
    chosen = settings.resolve(model, preset, overrides, lambda *_: None)
    registrar = pipeline.Registrar(model, chosen, lambda *_: None)
    stamps["loaded"] = time.time()
    passes = []
    for k in range(2):
        start = time.perf_counter()
        _, _, parts = registrar.register_files(fixed, moving, os.path.join(out, f"pass{k}"), [labels], overwrite=True)
        passes.append({**parts, "total": time.perf_counter() - start})
        stamps[f"pass{k}"] = time.time()
    print("PARTS " + json.dumps({"stamps": stamps, "first": passes[0], "second": passes[1]}), flush=True)


if __name__ == "__main__":
    main()
