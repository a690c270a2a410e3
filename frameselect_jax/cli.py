"""The `frameselect` command.

  frameselect select VIDEO "QUESTION" -k 8 [--checkpoint DIR] [--json] [--plot out.png]
  frameselect demo --out DIR

`select` prints the chosen frames' timestamps (or the selection-file record as JSON). With
no --checkpoint (and no --llm/--vision) it runs the tiny random preset, and says so: its
scores are random. `demo` writes a synthetic needle video, selects frames in it with the
tiny random preset, and writes selection.jsonl and a plot; it needs no downloads.
Errors the user can fix (missing files, bad checkpoints, bad arguments) print
`error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from frameselect_jax import errors

RANDOM_NOTICE = (
  "note: no --checkpoint given: using the tiny random preset. Its scores are "
  "untrained and random, so the chosen frames mean nothing; pass --checkpoint "
  "DIR (a training run) for real selections."
)
DEMO_QUESTIONS = ("When does the red square appear?", "Is there a red square in the video?")


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

  demo = commands.add_parser("demo", help="run the selector on a generated needle video")
  demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
  demo.add_argument("-k", type=int, default=8, help="frames to choose (default 8)")
  demo.add_argument("--seed", type=int, default=0, help="video and model seed")
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
  """Generated needle video -> tiny random selector -> selection.jsonl and selection.png."""
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)

  def step(number, text):
    print(f"[{number}/4] {text} ...", flush=True)
    return time.perf_counter()

  def done(since):
    print(f"      done in {time.perf_counter() - since:.1f} s", flush=True)

  from frameselect_jax import synthetic

  t = step(1, "writing a 20 s needle video (a red square shows for 0.5 s)")
  video_path = os.path.join(args.out, "needle.mp4")
  info = synthetic.needle_video(
    video_path, num_frames=160, fps=8, size=(96, 128), needle_len=4, seed=args.seed
  )
  done(t)

  t = step(2, "building the tiny random selector (n=128 candidates; first JAX use compiles)")
  from frameselect_jax import selection_file
  from frameselect_jax.api import FrameSelector

  selector = FrameSelector.random(num_candidates=128, seed=args.seed)
  done(t)
  print("      " + RANDOM_NOTICE.replace("no --checkpoint given: ", ""))

  t = step(
    3,
    f"selecting k={args.k} frames for {len(DEMO_QUESTIONS)} questions "
    "(decode + encode once, then one LLM pass per question)",
  )
  pairs = [(video_path, q) for q in DEMO_QUESTIONS]
  results = selector.select_many(pairs, k=args.k, batch_size=len(pairs))
  uniform = selector.select(video_path, DEMO_QUESTIONS[0], k=args.k, strategy="uniform")
  done(t)

  t = step(4, "writing selection.jsonl and selection.png")
  records = [r.to_json(qid=f"demo-{i}", video_id="needle") for i, r in enumerate(results)]
  records.append(uniform.to_json(qid="demo-uniform", video_id="needle"))
  jsonl_path = os.path.join(args.out, "selection.jsonl")
  selection_file.write(jsonl_path, records)
  plot_path = os.path.join(args.out, "selection.png")
  write_plot(
    results[0],
    plot_path,
    "tiny random preset, untrained: the scores are random",
    spans=[(info.start_s, info.stop_s, "needle shown (ground truth)")],
  )
  done(t)

  first = results[0]
  needle_candidates = [
    int(i)
    for i in range(first.n)
    if first.valid[i] and info.time_has_needle(first.candidate_timestamps[i])
  ]
  print()
  print(f"video        {video_path} ({info.duration_s:.0f} s, {info.num_frames} frames)")
  print(f"needle       {info.start_s:.2f}-{info.stop_s:.2f} s, in candidates {needle_candidates}")
  for name, result in (("nms_greedy", first), ("uniform", uniform)):
    hits = int(info.time_has_needle(result.timestamps).sum())
    print(
      f"{name:12s} {' '.join(f'{x:.2f}' for x in result.timestamps)} s "
      f"({hits} of {len(result.indices)} show the needle)"
    )
  print(
    f"encoded      {selector.encode_calls} video for {len(DEMO_QUESTIONS) + 1} selections "
    "(visual tokens cached per video)"
  )
  print(f"wrote        {jsonl_path}, {plot_path}")
  print(f"total        {time.perf_counter() - start:.1f} s")
  print(
    'next         frameselect select VIDEO "QUESTION" --checkpoint WORKDIR '
    "(a trained run of python -m train) --plot out.png"
  )
  return 0


def run() -> None:
  """The `frameselect` console script."""
  status = main()
  if status == errors.INPUT_ERROR_STATUS:
    errors.mute_stderr()
  sys.exit(status)


if __name__ == "__main__":
  run()
