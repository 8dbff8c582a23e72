"""Train VTN from an experiment config: ``vtn-train --config experiments/X.json``.

Examples:
  vtn-train --config experiments/hippocampus-cpu.json --run_dir runs/hippo
  vtn-train --config experiments/paper-liver-ADDD.json --set train.batch_size=4 \\
      --set data.manifest=prepared/liver/manifest.json
Start the same command again after an interruption: it resumes from the last
checkpoint in --run_dir. To train a run for longer, start it again with more epochs
(``--set train.epochs=5`` on a 3-epoch run); any other change needs a new --run_dir.
TensorBoard: ``tensorboard --logdir runs``.
"""

import json
import pathlib
import sys

from absl import app, flags

from vtn_tf.cli.common import setup, user_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "experiment config (JSON), e.g. experiments/hippocampus-cpu.json")
flags.DEFINE_string("run_dir", None, "where checkpoints, logs and the exact config go "
                    "(default: runs/<config name>)")
flags.DEFINE_multi_string("set", [], "override a config field: section.field=value (repeatable)")
flags.DEFINE_boolean("restart", False, "ignore checkpoints in run_dir and start over")
flags.DEFINE_boolean("verbose", False, "show tracebacks")
flags.DEFINE_integer("progress", None, "Keras progress display: 0 silent, 1 bar, 2 one line at the end "
                     "(default: a bar on a terminal, 2 otherwise)")


def main(argv):
    setup()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with user_errors("vtn-train", FLAGS.verbose):
        from vtn_tf.training import config as config_lib
        from vtn_tf.training import loop

        config = config_lib.load_config(FLAGS.config, FLAGS.set)
        run_dir = FLAGS.run_dir or str(pathlib.Path("runs") / pathlib.Path(FLAGS.config or "default").stem)
        progress = FLAGS.progress if FLAGS.progress is not None else (1 if sys.stdout.isatty() else 2)
        summary = loop.train(config, run_dir, restart=FLAGS.restart, verbose=progress)
        print(json.dumps(summary, indent=2))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
