"""Decoding the n=128 candidates of a long 720p H.264 video: seeking vs decoding every frame.

Compares `video.decode_candidates` (decord, seeking to each candidate and resizing
inside the decoder; also its PyAV fallback) with the naive way: decode every frame
with PyAV and keep the candidates. Each method runs in a fresh subprocess so its
peak memory (ru_maxrss) is its own. Prints seconds, peak memory and the speed-up
(target >= 5x); asserts nothing about timings.

The test video is generated once (low-complexity content, x264 ultrafast) and
cached in --cache-dir. How much seeking saves depends on the keyframe interval:
after a seek the decoder starts at the previous keyframe, so each candidate costs
about half a keyframe interval of decoding. Streaming encodes use about 2 s
(--gop-seconds 2, the default); x264's own default is 250 frames (--gop-seconds 0).

    python benchmarks/bench_decode.py [--minutes 10 --fps 24 --gop-seconds 2]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from frameselect_jax import synthetic, video

METHODS = {
  "decord": "decord, seek to candidates",
  "pyav-seek": "PyAV, seek to candidates",
  "pyav-all": "PyAV, decode every frame",
}


def bench_video_path(args) -> str:
  """Returns the cached benchmark video, generating it first if needed."""
  width = args.height * 16 // 9
  gop = f"gop{args.gop_seconds:g}s" if args.gop_seconds else "gopdefault"
  path = os.path.join(
    args.cache_dir, f"frameselect_bench_{args.minutes:g}min_{args.height}p_{args.fps}fps_{gop}.mp4"
  )
  if os.path.exists(path) and os.path.getsize(path) > 0:
    print(f"video: {path} (cached)")
    return path
  num_frames = int(round(args.minutes * 60 * args.fps))
  print(f"video: generating {path}: {num_frames} frames, {width}x{args.height} ...", flush=True)
  start = time.perf_counter()
  # Write under a temporary name and rename, so an interrupted run leaves no broken cache.
  partial = path + ".partial.mp4"
  synthetic.write_video(
    partial,
    moving_square_yuv(num_frames, args.height, width),
    args.fps,
    gop=int(round(args.gop_seconds * args.fps)) or None,
    input_format="yuv420p",
  )
  os.replace(partial, path)
  print(f"video: generated in {time.perf_counter() - start:.1f} s")
  return path


def moving_square_yuv(num_frames, height, width):
  """Planar yuv420p frames: a static luma ramp and a white square moving 7 px per
  frame, so consecutive frames differ but encoding stays cheap."""
  base = np.full((height * 3 // 2, width), 128, np.uint8)  # chroma planes grey
  base[:height] = np.linspace(16, 235, width).astype(np.uint8)[None, :]
  side, top = height // 8, height // 3
  for i in range(num_frames):
    frame = base.copy()
    left = (i * 7) % (width - side)
    frame[top : top + side, left : left + side] = 235
    yield frame


def rss_mb() -> float:
  """Current resident memory of this process (Linux)."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def worker(method, path, n, size, out_npy):
  """Runs one method in this (fresh) process; prints a JSON line of measurements."""
  import av  # noqa: F401  load both decoders' libraries first: that memory is not decoding
  import decord  # noqa: F401

  rss_before = rss_mb()
  start = time.perf_counter()
  frames_decoded = None
  if method in ("decord", "pyav-seek"):
    frames = video.decode_candidates(
      path, n=n, size=size, backend="decord" if method == "decord" else "pyav"
    ).frames
  else:
    frames, frames_decoded = decode_every_frame(path, n, size)
  seconds = time.perf_counter() - start
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  np.save(out_npy, frames)
  print(
    json.dumps(
      {
        "seconds": seconds,
        "rss_before_mb": rss_before,
        "peak_mb": peak_mb,
        "frames_decoded": frames_decoded,
      }
    )
  )


def decode_every_frame(path, n, size):
  """The naive baseline: decode every frame in order and keep the candidates
  (only those are converted to RGB, which favours the baseline)."""
  import av

  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    wanted = video.candidate_frame_indices(stream.frames, n)
    frames = np.zeros((len(wanted), size, size, 3), np.uint8)
    position = 0
    count = 0
    for count, frame in enumerate(container.decode(stream), start=1):
      if position < len(wanted) and count - 1 == wanted[position]:
        frames[position] = frame.to_ndarray(width=size, height=size, format="rgb24")
        position += 1
  return frames, count


def min_frames_to_decode(path, wanted):
  """The fewest frames any decoder must decode to reach the wanted frames: from the
  keyframe before each (or from the previous wanted frame, if that is later).
  Reads packet headers only, no decoding."""
  import av

  with av.open(path) as container:
    stream = container.streams.video[0]
    fps, time_base = float(stream.average_rate), float(stream.time_base)
    start = stream.start_time or 0
    keyframes = np.array(
      sorted(
        int(round((packet.pts - start) * time_base * fps))
        for packet in container.demux(stream)
        if packet.is_keyframe and packet.pts is not None
      )
    )
  previous = -1
  total = 0
  for target in wanted:
    keyframe = keyframes[np.searchsorted(keyframes, target, side="right") - 1]
    total += target - max(keyframe, previous + 1) + 1
    previous = target
  return int(total), len(keyframes)


def run_method(method, path, n, size, tmp_dir):
  """Runs `worker` in a subprocess; returns its measurements and decoded frames."""
  out_npy = os.path.join(tmp_dir, f"{method}.npy")
  command = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    method,
    "--path",
    path,
    "--n",
    str(n),
    "--size",
    str(size),
    "--out",
    out_npy,
  ]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
  measurements = json.loads(result.stdout.strip().splitlines()[-1])
  return measurements, np.load(out_npy)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--minutes", type=float, default=10.0, help="length of the test video")
  parser.add_argument("--fps", type=int, default=24)
  parser.add_argument("--height", type=int, default=720, help="16:9 frames of this height")
  parser.add_argument(
    "--gop-seconds",
    type=float,
    default=2.0,
    help="keyframe interval in seconds; 0 = x264 default (250 frames)",
  )
  parser.add_argument("--n", type=int, default=128, help="number of candidates")
  parser.add_argument("--size", type=int, default=224, help="candidate frames are size x size")
  parser.add_argument("--cache-dir", default=tempfile.gettempdir())
  parser.add_argument(
    "--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
  )
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.path, args.n, args.size, args.out)
    return

  path = bench_video_path(args)
  import av

  with av.open(path) as container:
    stream = container.streams.video[0]
    total, fps = stream.frames, float(stream.average_rate)
    width, height = stream.width, stream.height
  frame_mb = width * height * 3 / 2**20
  candidates_mb = args.n * args.size * args.size * 3 / 2**20
  gop = f"{args.gop_seconds:g} s" if args.gop_seconds else "x264 default (250 frames)"
  print(
    f"video: {total / fps / 60:.1f} min, {width}x{height}, {fps:g} fps, {total} frames, "
    f"keyframe interval {gop}, {os.path.getsize(path) / 2**20:.1f} MiB"
  )
  print(
    f"candidates: n={args.n}, {args.size}x{args.size} RGB = {candidates_mb:.1f} MiB; "
    f"one {width}x{height} RGB frame = {frame_mb:.1f} MiB"
  )
  needed, keyframes = min_frames_to_decode(path, video.candidate_frame_indices(total, args.n))
  print(
    f"seeking must still decode >= {needed} of {total} frames (from the keyframe before each "
    f"candidate; {keyframes} keyframes): speed-up ceiling about {total / needed:.1f}x"
  )
  print()
  print(
    f"{'method':28s} {'seconds':>8s} {'peak RSS':>10s} {'RSS growth':>11s} "
    f"{'growth - candidates':>20s}"
  )
  results, frames = {}, {}
  with tempfile.TemporaryDirectory() as tmp_dir:
    for method in args.methods.split(","):
      results[method], frames[method] = run_method(method, path, args.n, args.size, tmp_dir)
      r = results[method]
      growth = r["peak_mb"] - r["rss_before_mb"]
      extra = growth - candidates_mb
      print(
        f"{METHODS[method]:28s} {r['seconds']:8.2f} {r['peak_mb']:8.0f} MiB {growth:7.0f} MiB "
        f"{extra:8.0f} MiB = {extra / frame_mb:4.1f} frames",
        flush=True,
      )
  print()
  if "pyav-all" in results:
    baseline = results["pyav-all"]
    print(f"every-frame baseline decoded {baseline['frames_decoded']} frames")
    for method in results:
      if method == "pyav-all":
        continue
      speedup = baseline["seconds"] / results[method]["seconds"]
      diff = np.abs(frames[method].astype(np.int16) - frames["pyav-all"]).mean(axis=(1, 2, 3))
      print(
        f"{METHODS[method]}: {speedup:.1f}x faster than every frame (target >= 5x); "
        f"same frames: mean |pixel difference| per candidate <= {diff.max():.2f}"
      )
  print(
    "(peak RSS = ru_maxrss of the method's own subprocess; RSS growth = peak - RSS after imports)"
  )


if __name__ == "__main__":
  main()
