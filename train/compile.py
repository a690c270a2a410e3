"""python -m train.compile --config=configs/stage2.py --topology=v5e:4x4 [--json_out=F]

Compiles the real train step for a TPU topology from a CPU host (needs libtpu, no TPU) and
prints per device: memory, FLOPs and step-time bounds (`train/aot.py` says what each number
is). With --cache_dir, a program compiled before is read from there (train.aot.program_key).
Exits 1 when the step does not fit the chip's HBM, 2 on a configuration error.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from frameselect_jax import errors

config_flags.DEFINE_config_file(
  "config", None, "Experiment config (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1.")
flags.DEFINE_string("json_out", None, "Also write the report as JSON to this file.")
flags.DEFINE_string(
  "cache_dir", None, "Read the compile from here when this program was compiled before; store it."
)


def main(argv):
  del argv
  from train.aot import GIB, compile_report, format_report
  from train.trainer import ConfigError

  if not flags.FLAGS.topology:
    errors.exit_with("--topology is required, e.g. --topology=v5e:4x4")
  try:
    if flags.FLAGS.json_out:
      errors.check_can_write_file(flags.FLAGS.json_out, "--json_out")
    report = compile_report(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.cache_dir)
  except ConfigError as e:
    errors.exit_with(str(e), prefix="config error")
  except errors.InputError as e:
    errors.exit_with(str(e))
  print(format_report(report))
  if flags.FLAGS.json_out:
    errors.write_atomically(flags.FLAGS.json_out, json.dumps(report, indent=2))
  too_big = [(t, r) for t, r in report["tasks"].items() if not r["fits"]]
  if too_big:
    for task, r in too_big:
      if "compile_error" in r:
        print(
          f"error: the {task} step does not fit the {r['hbm_bytes'] / GIB:.2f} GiB HBM of a "
          f"{report['chip']} chip: {r['compile_error']}",
          file=sys.stderr,
        )
        continue
      print(
        f"error: the {task} step needs {r['total_bytes'] / GIB:.2f} GiB per device "
        f"(arguments {r['argument_bytes'] / GIB:.2f} + outputs {r['output_bytes'] / GIB:.2f} "
        f"- aliased {r['alias_bytes'] / GIB:.2f} + temporaries {r['temp_bytes'] / GIB:.2f}), "
        f"more than the {r['hbm_bytes'] / GIB:.2f} GiB HBM of a {report['chip']} chip",
        file=sys.stderr,
      )
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=errors.parse_flags)
