"""What keying the trainer's visual-token cache by content costs: the time to hash one video's
candidates (`visual_cache.content_key`) against the time the frozen tower takes to encode them,
which the cache saves. Also the check that an entry is whole (reading it back and verifying its
digest: `VisualTokenCache.load`) against loading it unchecked with np.load.

  python benchmarks/bench_cache_key.py [--repeats=5]

Configs (bench_cache.py's; random weights, the time does not depend on their values):
  tiny  the CPU test preset (56 px tower), n=128 candidates
  base  SigLIP base/16 at 224 px, n=32 candidates (n=128 would take a minute per encode on two
        cores; hashing and encoding both scale linearly in n, so the ratio holds)
Records store candidates as JPEG bytes (the array_record datasets) or as decoded frames (the
needle source in memory); both are hashed. Compilation is excluded.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.bench_cache import best_of, configs  # noqa: E402
from frameselect_jax import records, video, visual_cache  # noqa: E402
from frameselect_jax.models.selector import Selector  # noqa: E402


def bench(name, cfg, repeats):
  n, size = cfg.num_candidates, cfg.vision.image_size
  rng = np.random.default_rng(0)
  # Smooth random images: JPEG sizes like real frames', not like noise.
  small = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
  frames = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)
  base = dict(video_id="v", timestamps=np.arange(n, dtype=np.float32), valid=np.ones(n, bool))
  as_jpeg = dict(base, video=records.encode_jpeg_frames(frames))
  as_frames = dict(base, frames=frames)
  jpeg_kb = sum(len(b) for b in as_jpeg["video"]) / 1e3

  graphdef, state = nnx.split(Selector(cfg, rngs=nnx.Rngs(0)))

  @jax.jit
  def encode(state, frames):  # what the trainer's cache fill runs
    return nnx.merge(graphdef, state).encode_frames(video.normalize(frames))

  batch = frames[None]
  tokens = np.asarray(encode(state, batch))[0]  # compile
  encode_s = best_of(repeats, lambda: encode(state, batch).block_until_ready())
  hash_jpeg_s = best_of(repeats, lambda: visual_cache.content_key(as_jpeg, size))
  hash_frames_s = best_of(repeats, lambda: visual_cache.content_key(as_frames, size))
  with tempfile.TemporaryDirectory() as folder:
    cache = visual_cache.VisualTokenCache(folder)
    key = visual_cache.content_key(as_jpeg, size)
    cache.put(key, tokens)
    checked_s = best_of(repeats, lambda: cache.load(key))
    plain = os.path.join(folder, "plain.npy")
    np.save(plain, tokens)
    unchecked_s = best_of(repeats, lambda: np.load(plain))
  ms = lambda s: f"{s * 1e3:9.2f} ms"
  print(
    f"\n{name}: n={n}, {size} px, tokens {tokens.shape} float32 "
    f"({tokens.nbytes / 1e6:.1f} MB); JPEG candidates {jpeg_kb:.0f} kB"
  )
  print(f"  encode (tower + pooling, jitted):     {ms(encode_s)}")
  print(
    f"  content_key of the JPEG bytes:        {ms(hash_jpeg_s)}  "
    f"({hash_jpeg_s / encode_s:.2g} of encoding)"
  )
  print(
    f"  content_key of the decoded frames:    {ms(hash_frames_s)}  "
    f"({hash_frames_s / encode_s:.2g} of encoding)"
  )
  print(f"  load with digest check:               {ms(checked_s)}")
  print(f"  np.load, unchecked:                   {ms(unchecked_s)}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="all", choices=("all", "tiny", "base"))
  parser.add_argument("--repeats", type=int, default=5, help="timed runs (minimum is printed)")
  args = parser.parse_args()
  print(f"{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.default_backend()}")
  for name, cfg in configs(args.config).items():
    bench(name, cfg, args.repeats)


if __name__ == "__main__":
  main()
