"""python -m train --config=configs/stage1.py[:arg] [--config.some.field=value] [--workdir=DIR]

Runs one training stage: metrics go to <workdir>/metrics.jsonl and <workdir>/tensorboard,
checkpoints to <workdir>/checkpoints (resumed from automatically). Exits with status 2 on a
configuration error, 143 after a SIGTERM (preemption) checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from frameselect_jax import errors

config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir).")
flags.mark_flags_as_required(["config"])


class _OnlyOurInfo(logging.logging.Filter):
  """Libraries (orbax, grain) log every save at INFO; keep their warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "site-packages" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  from train import trainer  # after flag parsing: grain workers need parsed absl flags

  config = flags.FLAGS.config
  try:
    summary = trainer.run(config, flags.FLAGS.workdir)
  except trainer.ConfigError as e:
    errors.exit_with(str(e), prefix="config error")
  except errors.InputError as e:
    errors.exit_with(str(e))
  logging.info("finished: %s", summary)
  if summary["preempted"]:
    sys.exit(trainer.exit_code_for_preemption())


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
