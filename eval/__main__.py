"""python -m eval --config=configs/eval/<benchmark>.py[:arg] [--shard=i/N]
python -m eval merge --config=... --inputs=<shard folder>,... --output=<folder>

Evaluates frame-selection strategies on a benchmark with a downstream model and writes
report.md, report.json, accuracy_vs_frames.png, selections.jsonl and results.jsonl to the
config's output folder (eval/harness.py). Exits with status 2 on a configuration error.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from frameselect_jax import errors


def main(argv):
  from eval import harness

  config = flags.FLAGS.config
  try:
    if argv[1:] == ["merge"]:
      out = harness.merge(flags.FLAGS.inputs, flags.FLAGS.output or config.output, config)
    elif argv[1:]:
      errors.exit_with(f"unknown command {' '.join(argv[1:])!r}; the only one is 'merge'")
    else:
      out = harness.run(config, errors.parse_shard(flags.FLAGS.shard))
  except errors.InputError as e:
    errors.exit_with(str(e))
  print(open(f"{out}/report.md").read())
  print(f"report: {out}/report.md, report.json, accuracy_vs_frames.png")
  sys.stdout.flush()


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Eval config (configs/eval/<benchmark>.py).")
  flags.DEFINE_string("shard", "0/1", "i/N: evaluate every N-th question, from the i-th.")
  flags.DEFINE_list("inputs", [], "merge: the shard folders to join.")
  flags.DEFINE_string("output", "", "merge: the joined folder (default: the config's output).")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=errors.parse_flags)
