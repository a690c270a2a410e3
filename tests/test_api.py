"""The inference API (FrameSelector), the selection file, the plot and the `frameselect` command."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frameselect_jax import cli, selection_file, synthetic, text, video
from frameselect_jax.api import FrameSelector

N = 16  # candidates per video in these tests
QUESTION = "When does the red square appear?"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("videos")
  long = synthetic.needle_video(folder / "long.mp4", num_frames=48, fps=8, size=(64, 80), seed=1)
  other = synthetic.needle_video(folder / "other.mp4", num_frames=40, fps=8, size=(64, 64), seed=2)
  short = synthetic.needle_video(
    folder / "short.mp4", num_frames=10, fps=8, size=(64, 64), needle_start=3, seed=3
  )
  return {"long": long.path, "other": other.path, "short": short.path}


@pytest.fixture(scope="module")
def selector():
  return FrameSelector.random(num_candidates=N)


def test_select_returns_k_sorted_unique_valid_frames_and_all_scores(selector, videos):
  result = selector.select(videos["long"], QUESTION, k=4)
  assert len(result.indices) == 4 and result.k == 4 and result.n == N
  assert np.all(np.diff(result.indices) > 0)
  assert result.scores.shape == (N,) and np.isfinite(result.scores).all()
  assert result.valid.all()
  candidates = video.decode_candidates(videos["long"], n=N, size=selector.image_size)
  np.testing.assert_array_equal(result.timestamps, candidates.timestamps[result.indices])
  np.testing.assert_array_equal(result.frame_indices, candidates.frame_indices[result.indices])
  np.testing.assert_array_equal(result.candidate_timestamps, candidates.timestamps)


def test_select_many_equals_select_and_encodes_each_video_once(videos):
  batched = FrameSelector.random(num_candidates=N)
  pairs = [
    (videos["long"], QUESTION),
    (videos["other"], "What colour is the square?"),
    (videos["long"], "Where is the square?", ["left", "right"]),
    (videos["other"], QUESTION),
    (videos["long"], "Is anything red in the video?"),
  ]
  results = batched.select_many(pairs, k=4, batch_size=3)
  assert batched.encode_calls == 2  # two videos, five questions
  single = FrameSelector.random(num_candidates=N)
  for pair, result in zip(pairs, results):
    alone = single.select(*pair[:2], k=4, options=pair[2] if len(pair) == 3 else ())
    assert result.video == os.path.abspath(pair[0]) and result.question == pair[1]
    np.testing.assert_array_equal(result.indices, alone.indices)
    np.testing.assert_allclose(result.scores, alone.scores, atol=1e-5)
  # Cached: asking again encodes nothing; a rewritten file is encoded again.
  batched.select_many(pairs[:2], k=4)
  assert batched.encode_calls == 2
  stat = os.stat(videos["other"])
  os.utime(videos["other"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
  batched.select(videos["other"], QUESTION, k=4)
  assert batched.encode_calls == 3


def test_the_cache_is_lru_and_bounded(videos):
  selector = FrameSelector.random(num_candidates=N, cache_size=1)
  selector.select(videos["long"], QUESTION, k=4)
  selector.select(videos["other"], QUESTION, k=4)  # evicts "long"
  selector.select(videos["long"], QUESTION, k=4)
  assert selector.encode_calls == 3


def test_a_span_is_part_of_the_cache_key(videos):
  """Two bounded questions about one file (6 s at 8 fps) with different spans have different
  candidates, so different tokens; the same span again is a cache hit."""
  selector = FrameSelector.random(num_candidates=N)
  early = selector.visual_tokens(videos["long"], span=(0, 3))
  late = selector.visual_tokens(videos["long"], span=(3, 6))
  assert selector.encode_calls == 2
  assert early.frame_indices.max() < 24 <= late.frame_indices.min()
  assert not np.allclose(early.tokens, late.tokens)
  selector.visual_tokens(videos["long"], span=(0.0, 3.0))
  assert selector.encode_calls == 2
  pairs = [
    (videos["long"], QUESTION, (), (3, 6)),
    (videos["long"], QUESTION),
    (videos["long"], "Where is the square?", ["left", "right"], (0, 3)),
  ]
  results = selector.select_many(pairs, k=4)
  assert selector.encode_calls == 3  # the whole video is a third set of candidates
  np.testing.assert_array_equal(results[0].candidate_frame_indices, late.frame_indices)
  np.testing.assert_array_equal(results[2].candidate_frame_indices, early.frame_indices)
  assert np.all(results[0].frame_indices >= 24) and np.all(results[2].frame_indices < 24)
  with pytest.raises(ValueError, match="0 <= start_s < end_s"):
    selector.select(videos["long"], QUESTION, k=4, span=(3, 1))


def test_json_record_round_trips(selector, videos, tmp_path):
  results = [
    selector.select(videos["long"], QUESTION, k=4),
    selector.select(videos["short"], QUESTION, k=4, strategy="top_k"),
  ]
  records = [r.to_json() for r in results] + [results[0].to_json(qid="q7", video_id="vid")]
  path = tmp_path / "selection.jsonl"
  assert selection_file.write(str(path), records) == 3
  assert selection_file.read(str(path)) == records
  record = records[0]
  assert set(record) == {"qid", "video_id", "strategy", "n", "k", "indices", "timestamps", "scores"}
  assert record["video_id"] == "long" and record["n"] == N and record["k"] == 4
  assert record["indices"] == results[0].indices.tolist()
  np.testing.assert_allclose(record["timestamps"], results[0].timestamps, atol=1e-6)
  assert len(record["scores"]) == N
  # Padding scores (-inf) are written as null, so every line is strict JSON.
  short = records[1]
  assert short["scores"][10:] == [None] * (N - 10) and None not in short["scores"][:10]
  assert records[2]["qid"] == "q7" and records[2]["video_id"] == "vid"


@pytest.mark.parametrize("strategy", ["nms_greedy", "top_k", "uniform"])
def test_padding_of_a_short_video_is_masked_and_never_selected(selector, videos, strategy):
  result = selector.select(videos["short"], QUESTION, k=4, strategy=strategy)
  assert result.valid.sum() == 10 and not result.valid[10:].any()
  assert np.all(result.scores[10:] == -np.inf) and np.isfinite(result.scores[:10]).all()
  assert result.valid[result.indices].all() and len(result.indices) == 4
  # More frames asked for than the video has: all the valid ones, nothing else.
  every = selector.select(videos["short"], QUESTION, k=12, strategy=strategy)
  np.testing.assert_array_equal(every.indices, np.arange(10))


def test_scores_of_real_frames_do_not_depend_on_padding_frames(selector, videos):
  """The padding frames are zeros; whatever they were, the valid scores stay the same."""
  entry = selector.visual_tokens(videos["short"])
  prompt = text.question_prompt(QUESTION)
  noisy = entry._replace(tokens=entry.tokens.at[:, 10:].set(5.0))
  np.testing.assert_allclose(
    selector.score([noisy], [prompt])[0, :10], selector.score([entry], [prompt])[0, :10], atol=1e-5
  )


def test_wrong_n_and_bad_arguments_are_errors(selector, videos):
  with pytest.raises(ValueError, match="n=16 candidates"):
    selector.select(videos["long"], QUESTION, n=32)
  with pytest.raises(ValueError, match="k must be"):
    selector.select(videos["long"], QUESTION, k=N + 1)
  with pytest.raises(ValueError, match="unknown strategy"):
    selector.select(videos["long"], QUESTION, strategy="best")
  with pytest.raises(ValueError, match="empty"):
    selector.select(videos["long"], "  ")
  with pytest.raises(video.VideoError, match="no such file"):
    selector.select(videos["long"] + ".missing", QUESTION)


# --- Hugging Face directories and training checkpoints ---


class SmallVocabTokenizer:
  """Bytes folded into the 97-token vocabulary of the tiny random Qwen2 (conftest)."""

  def encode(self, text, add_special_tokens=False):
    return [b % 97 for b in text.encode()]


def test_from_hf_with_tiny_random_checkpoints(qwen2_dir, siglip_dir, videos):
  llm_dir, vision_dir = qwen2_dir, siglip_dir
  selector = FrameSelector.from_hf(
    llm_dir, vision_dir, num_candidates=N, tokenizer=SmallVocabTokenizer()
  )
  assert not selector.trained and "untrained" in selector.description
  assert selector.image_size == 28
  result = selector.select(videos["long"], QUESTION, k=4)
  assert len(result.indices) == 4 and np.isfinite(result.scores).all()
  # No tokenizer files in the directory: a clear error, not a transformers traceback.
  with pytest.raises((ValueError, OSError), match="tokenizer"):
    FrameSelector.from_hf(llm_dir, vision_dir, num_candidates=N)


def _save_trainer_checkpoint(directory, config, params, step=3):
  """A checkpoint as the trainer writes it (frameselect_jax.checkpoint.Checkpointer)."""
  import grain

  from frameselect_jax import checkpoint as ckpt

  checkpointer = ckpt.Checkpointer(str(directory), save_every=1, keep=1, async_save=False)
  checkpointer.save(
    step,
    params=params,
    opt_state={"count": jnp.zeros(())},
    data_iterator=iter(grain.MapDataset.range(4).to_iter_dataset()),
    meta={"config": config.to_json(), "config_stage": config.stage, "step": step},
    force=True,
  )
  checkpointer.close()


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
  """A stage-2 (LoRA) tiny checkpoint with non-trivial trained parameters, and the model the
  trainer would evaluate, built with the trainer's own code."""
  from configs import stage2
  from frameselect_jax import experiment
  from train import modeling

  config = stage2.get_config("tiny")
  model = experiment.build_model(config)
  graphdef, params, frozen = modeling.split(model, config)
  params = nnx.to_pure_dict(params)
  keys = iter(jax.random.split(jax.random.key(7), 1000))
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), params)
  frozen = jax.tree.map(
    lambda x: x.astype(experiment.frozen_dtype(config.model.frozen_dtype)(x)),
    nnx.to_pure_dict(frozen),
  )
  workdir = tmp_path_factory.mktemp("stage2")
  _save_trainer_checkpoint(workdir / "checkpoints", config, params)
  return workdir, config, params, nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))


def test_from_checkpoint_rebuilds_the_trained_model(stage2_run, videos):
  workdir, config, params, trained = stage2_run
  selector = FrameSelector.from_checkpoint(str(workdir))  # the workdir or its checkpoints/
  assert selector.trained and selector.num_candidates == config.model.num_candidates
  assert "step 3" in selector.description and "stage 2" in selector.description
  mine = nnx.to_pure_dict(selector.state)
  theirs = nnx.to_pure_dict(nnx.state(trained))
  assert jax.tree.structure(mine) == jax.tree.structure(theirs)  # LoRA adapters included
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype and a.shape == b.shape
    # The random tiny backbone is re-initialised: equal up to one bf16 rounding.
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-4)

  def exactly_restored(path, saved):  # the trained parameters come back bit for bit
    node = mine
    for key in path:
      node = node[key.key]
    np.testing.assert_array_equal(np.asarray(node), np.asarray(saved))

  jax.tree_util.tree_map_with_path(exactly_restored, params)
  result = selector.select(videos["long"], QUESTION, k=4)
  assert len(result.indices) == 4
  again = FrameSelector.from_checkpoint(str(workdir / "checkpoints"), dtype="float32")
  assert again.config.dtype == "float32"


def test_incompatible_checkpoints_are_clear_errors(stage2_run, tmp_path):
  _, config, params, _ = stage2_run
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.model.num_candidates = 32  # the saved score head has 16 outputs
  _save_trainer_checkpoint(tmp_path / "mismatch", other, params)
  # named before any read starts (an orbax restore failing part-way leaves reads in flight)
  with pytest.raises(
    ValueError,
    match=r"does not match.*\['score_head'\].* has shape "
    r"\((\d+, )?16,?\), the model expects \((\d+, )?32,?\)",
  ):
    FrameSelector.from_checkpoint(str(tmp_path / "mismatch"))
  # restore_params itself: a parameter the checkpoint lacks is named too
  from frameselect_jax import checkpoint as ckpt

  _save_trainer_checkpoint(tmp_path / "same", config, params)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract["score_head"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(ValueError, match=r"parameter \['score_head'\]\['extra'\] is not in the"):
    ckpt.restore_params(str(tmp_path / "same"), abstract)
  moved = config.copy_and_resolve_references()
  with moved.unlocked():  # trained on another machine: its backbone paths are not here
    moved.model.llm_dir, moved.model.vision_dir = "/elsewhere/qwen", "/elsewhere/siglip"
  _save_trainer_checkpoint(tmp_path / "moved", moved, params)
  with pytest.raises(FileNotFoundError, match="llm_dir=/vision_dir="):
    FrameSelector.from_checkpoint(str(tmp_path / "moved"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    FrameSelector.from_checkpoint(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    FrameSelector.from_checkpoint(str(tmp_path))


# --- the command ---


def test_cli_select_prints_timestamps_and_json(videos, capsys):
  assert cli.main(["select", videos["long"], QUESTION, "-k", "4", "-n", str(N)]) == 0
  out, err = capsys.readouterr()
  assert "random" in err and "untrained" in err  # the notice goes to stderr
  timestamps = [float(t) for t in out.strip().splitlines()[-1].split(":")[1].split()]
  assert len(timestamps) == 4 and timestamps == sorted(timestamps)

  assert (
    cli.main(
      [
        "select",
        videos["long"],
        QUESTION,
        "-k",
        "4",
        "-n",
        str(N),
        "--json",
        "--option",
        "early",
        "--option",
        "late",
      ]
    )
    == 0
  )
  record = json.loads(capsys.readouterr().out)
  assert record["k"] == 4 and record["n"] == N and len(record["indices"]) == 4
  assert record["strategy"] == "nms_greedy" and len(record["scores"]) == N


def test_cli_plot_writes_a_png(videos, tmp_path, capsys):
  import matplotlib.image

  out = tmp_path / "plot.png"
  assert (
    cli.main(["select", videos["short"], QUESTION, "-k", "4", "-n", str(N), "--plot", str(out)])
    == 0
  )
  image = matplotlib.image.imread(out)
  height, width = image.shape[:2]
  assert image.shape[2] in (3, 4) and 250 <= height <= 1500 and 700 <= width <= 1600


def test_cli_errors_are_one_clear_line(videos, tmp_path, capsys):
  cases = [
    (["select", str(tmp_path / "missing.mp4"), QUESTION], "missing.mp4"),
    (["select", videos["long"], QUESTION, "--checkpoint", str(tmp_path / "nockpt")], "nockpt"),
    (["select", videos["long"], QUESTION, "--checkpoint", str(tmp_path)], "holds no checkpoint"),
    (["select", videos["long"], QUESTION, "-n", str(N), "-k", "99"], "k must be"),
    (["select", videos["long"], QUESTION, "--llm", str(tmp_path)], "--vision"),
  ]
  for argv, expected in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "error: " in err and expected in err and "Traceback" not in err, err
  not_a_video = tmp_path / "notes.mp4"
  not_a_video.write_text("not a video")
  assert cli.main(["select", str(not_a_video), QUESTION, "-n", str(N)]) == 2
  assert "cannot decode" in capsys.readouterr().err
