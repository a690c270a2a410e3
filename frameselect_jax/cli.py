"""The `frameselect` command.

  frameselect select VIDEO "QUESTION" -k 8 [--checkpoint DIR] [--json] [--plot out.png]
  frameselect demo --out DIR [--small]

`select` prints the chosen frames' timestamps (or the selection-file record as JSON). With
no --checkpoint (and no --llm/--vision) it runs the tiny random preset, and says so: its
scores are random. `demo` is the main job (frameselect_jax/demo.py): it generates the needle
benchmark, labels it, builds the dataset, trains both stages and evaluates the trained
selector against the other strategies, from the repository root; it needs no downloads.
Errors the user can fix (missing files, bad checkpoints, bad arguments) print
`error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from frameselect_jax import errors

RANDOM_NOTICE = (
  "note: no --checkpoint given: using the tiny random preset. Its scores are "
  "untrained and random, so the chosen frames mean nothing; pass --checkpoint "
  "DIR (a training run) for real selections."
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="frameselect", description="Question-aware video frame selection (M-LLM selector)."
  )
  commands = parser.add_subparsers(dest="command", required=True)

  select = commands.add_parser("select", help="choose the k frames that help answer a question")
  select.add_argument("video", help="video file")
  select.add_argument("question", help="the question about the video")
  select.add_argument("-k", type=int, default=8, help="frames to choose (default 8)")
  select.add_argument(
    "-n",
    type=int,
    default=None,
    help="candidate frames scored (default: the model's; 128 for the random preset)",
  )
  select.add_argument(
    "--strategy",
    default="nms_greedy",
    choices=("nms_greedy", "top_k", "uniform"),
    help="default nms_greedy",
  )
  select.add_argument(
    "--option",
    action="append",
    default=[],
    metavar="TEXT",
    help="an answer option (repeat for multiple choice)",
  )
  select.add_argument(
    "--checkpoint", metavar="DIR", help="a training run's workdir (or its checkpoints/ folder)"
  )
  select.add_argument(
    "--llm",
    metavar="DIR",
    help="Qwen2.5 Hugging Face directory (with --vision: untrained head; "
    "with --checkpoint: overrides the backbone path it names)",
  )
  select.add_argument("--vision", metavar="DIR", help="SigLIP Hugging Face directory")
  select.add_argument(
    "--tokenizer", metavar="DIR", help="tokenizer directory, or 'byte' (default: the model's)"
  )
  select.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    help="compute dtype (default: the checkpoint's; float32 otherwise)",
  )
  select.add_argument(
    "--backend",
    default="auto",
    choices=("auto", "decord", "pyav"),
    help="video decoder (default auto: PyAV, then decord)",
  )
  select.add_argument(
    "--json", action="store_true", help="print the selection-file record (one JSON line)"
  )
  select.add_argument("--plot", metavar="PNG", help="write the score curve and thumbnails here")

  demo = commands.add_parser(
    "demo", help="the main job: generate, label, build, train and evaluate on needle videos"
  )
  demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
  demo.add_argument(
    "--small", action="store_true", help="a few videos and steps: the machinery only (tests)"
  )
  return parser


def main(argv=None) -> int:
  """Runs the command; returns the exit status (0 ok, 2 for a user error)."""
  args = build_parser().parse_args(argv)
  try:
    if args.command == "select":
      return run_select(args)
    return run_demo(args)
  except (FileNotFoundError, ValueError, OSError) as error:  # VideoError is a ValueError
    print(f"error: {_message(error)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


def _message(error: BaseException) -> str:
  if isinstance(error, OSError) and error.filename and error.strerror:
    return f"{error.filename}: {error.strerror}"
  return str(error)


# --- select ---


def load_selector(args, num_candidates: int | None):
  """The FrameSelector the arguments ask for; prints the random-preset notice when used."""
  import logging

  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every restore
  from frameselect_jax.api import FrameSelector

  common = dict(backend=args.backend)
  if args.checkpoint:
    return FrameSelector.from_checkpoint(
      args.checkpoint,
      llm_dir=args.llm,
      vision_dir=args.vision,
      tokenizer=args.tokenizer,
      dtype=args.dtype,
      **common,
    )
  if args.llm or args.vision:
    if not (args.llm and args.vision):
      raise ValueError("--llm and --vision go together (or use --checkpoint)")
    print(
      "note: --llm/--vision without --checkpoint: the score head is untrained, so the "
      "scores are random.",
      file=sys.stderr,
    )
    return FrameSelector.from_hf(
      args.llm,
      args.vision,
      num_candidates=num_candidates or 128,
      dtype=args.dtype or "float32",
      tokenizer=args.tokenizer,
      **common,
    )
  print(RANDOM_NOTICE, file=sys.stderr)
  return FrameSelector.random(num_candidates=num_candidates or 128, **common)


def run_select(args) -> int:
  # Fail on the cheap checks before loading a model.
  if not os.path.exists(args.video):
    raise FileNotFoundError(f"video {args.video!r} does not exist")
  if args.checkpoint and not os.path.isdir(args.checkpoint):
    raise FileNotFoundError(f"checkpoint directory {args.checkpoint!r} does not exist")
  if args.plot:
    errors.check_can_write_file(args.plot, "--plot")
  if args.k < 1:
    raise ValueError(f"-k must be >= 1, got {args.k}")
  selector = load_selector(args, args.n)
  result = selector.select(
    args.video, args.question, k=args.k, n=args.n, strategy=args.strategy, options=args.option
  )
  if args.json:
    import json

    print(json.dumps(result.to_json(), allow_nan=False))
  else:
    print(describe(result))
  if args.plot:
    note = None if selector.trained else "untrained selector: the scores are random"
    write_plot(result, args.plot, note)
    print(f"plot: {args.plot}", file=sys.stderr)
  return 0


def describe(result) -> str:
  """The chosen frames as a small table, then their timestamps on one line."""
  lines = [
    f"{result.video}: {len(result.indices)} of {int(result.valid.sum())} candidates "
    f"({result.strategy}), video {result.duration:.2f} s",
    "  index   time (s)   sigmoid(score)",
  ]
  probabilities = result.probabilities
  for index, t in zip(result.indices, result.timestamps):
    lines.append(f"  {int(index):5d}   {t:8.3f}   {probabilities[index]:.4f}")
  lines.append("timestamps: " + " ".join(f"{t:.3f}" for t in result.timestamps))
  return "\n".join(lines)


def write_plot(result, path: str, note: str | None = None, spans=()):
  from frameselect_jax import plot

  try:
    thumbnails = plot.load_thumbnails(result.video, result.frame_indices)
  except Exception as error:  # a plot without thumbnails beats no plot
    print(f"warning: no thumbnails ({error})", file=sys.stderr)
    thumbnails = None
  return plot.plot_selection(result, path, thumbnails, note=note, spans=spans)


# --- demo ---


def run_demo(args) -> int:
  """The main job (frameselect_jax/demo.py): generate, label, build, train, evaluate."""
  from frameselect_jax import demo

  try:
    demo.run(args.out, small=args.small)
  except RuntimeError as error:  # a stage failed: its own output says why
    print(f"demo: {error}", file=sys.stderr)
    return 1
  return 0


def run() -> None:
  """The `frameselect` console script."""
  status = main()
  if status == errors.INPUT_ERROR_STATUS:
    errors.mute_stderr()
  sys.exit(status)


if __name__ == "__main__":
  run()
