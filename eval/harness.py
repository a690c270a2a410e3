"""The evaluation run: items -> candidates -> selections -> answers -> scored results.

Per item, in three overlapping stages:
1. decode (background workers, running `decode.prefetch` items ahead): the n candidates over
   the item's span (`video.decode_candidates`, as training and labels do);
2. select (this thread): every strategy at every k, through `frameselect_jax.selection`
   (the selector's scores through `api.FrameSelector`, its visual tokens cached per video);
   written to <output>/selections.jsonl before any answer;
3. answer (background workers, `downstream.concurrency` at once): the downstream model sees
   the chosen frames in temporal order; the answer is parsed (multiple choice) or judged
   (open-ended) and written to <output>/results.jsonl, one whole line per (qid, strategy, k).

Resumable: lines already in results.jsonl are not redone (a half line a killed run left is
cut off first), and selections already made are reused. `strategies` may name selection
files made elsewhere (`file:<path>`): their picks are answered as they are. A missing or
undecodable video stays in the results (status, never correct): the report's denominator
keeps it. `--shard=i/N` evaluates every N-th item from the i-th into <output>/shard-i-of-N;
`merge` joins shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import time
import zlib

import numpy as np

from eval import answers, downstream
from frameselect_jax import errors, jsonl, selection, selection_file, video, videoqa

SELECTOR_STRATEGIES = ("top_k", "nms_greedy")
SIGLIP_STRATEGIES = ("siglip_top_k", "siglip_nms", "bolt", "aks")
GENS_STRATEGIES = ("gens_top_k", "gens_nms")
STATUS_OK, STATUS_MISSING, STATUS_UNDECODABLE = "ok", "missing_video", "undecodable"


class EvalConfigError(errors.InputError):
  pass


# --- Set-up from the config ---


def parse_strategies(names) -> list[str]:
  names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
  if not names:
    raise EvalConfigError("strategies is empty")
  known = ("uniform", "random", *SCORED_STRATEGIES)
  for name in names:
    if name not in known and not name.startswith("file:"):
      raise EvalConfigError(
        f"unknown strategy {name!r}; choose from {', '.join(known)}, or file:<selection file>"
      )
  return names


def parse_ks(ks, n: int) -> list[int]:
  ks = sorted({int(k) for k in ks})
  if not ks or any(not 1 <= k <= n for k in ks):
    raise EvalConfigError(f"ks={ks} must be frame budgets in [1, n={n}]")
  return ks


def make_selector(config):
  from frameselect_jax import api

  s = config.selector
  try:
    if s.checkpoint:
      return api.FrameSelector.from_checkpoint(s.checkpoint)
    if s.llm_dir or s.vision_dir:
      return api.FrameSelector.from_hf(
        s.llm_dir, s.vision_dir, num_candidates=config.num_candidates
      )
    if s.random:
      return api.FrameSelector.random(num_candidates=config.num_candidates, seed=config.seed)
  except (OSError, ValueError) as e:
    raise EvalConfigError(f"selector: {errors.one_line(e, limit=300)}") from None
  raise EvalConfigError(
    "top_k and nms_greedy need a selector: selector.checkpoint, selector.llm_dir and "
    "vision_dir, or selector.random=True (scores that mean nothing)"
  )


def make_downstream(config):
  d = config.downstream
  if d.kind == "needle_reader":
    return downstream.NeedleDownstream(seed=config.seed)
  from frameselect_jax import mllm

  if d.kind == "openai":
    if not d.openai.base_url or not d.openai.model:
      raise EvalConfigError("downstream.openai needs base_url and model")
    backend = mllm.OpenAIBackend(
      d.openai.base_url,
      d.openai.model,
      d.openai.api_key or None,
      timeout_s=d.openai.timeout_s,
      retries=d.openai.retries,
      backoff_s=d.openai.backoff_s,
      concurrency=1,
    )
    name = f"openai:{d.openai.model}@{d.openai.base_url}"
  elif d.kind == "transformers":
    backend = mllm.TransformersBackend(d.transformers.model_dir, device=d.transformers.device)
    name = f"transformers:{os.path.abspath(d.transformers.model_dir)}"
  else:
    raise EvalConfigError(
      f"downstream.kind={d.kind!r}; choose one of openai, transformers, needle_reader"
    )
  return downstream.ModelDownstream(
    backend,
    name,
    d.template,
    d.open_template,
    number_frames=d.number_frames,
    max_tokens=d.max_tokens,
    as_video=d.kind == "transformers" and d.transformers.as_video,
  )


def make_siglip(config):
  from frameselect_jax import similarity

  if not config.similarity.siglip_dir:
    raise EvalConfigError(
      "siglip_top_k, siglip_nms, bolt and aks need similarity.siglip_dir (a Hugging Face "
      "SiglipModel directory: the text tower and the pooling head)"
    )
  try:
    return similarity.SiglipScorer(
      config.similarity.siglip_dir, batch_size=config.similarity.batch_size
    )
  except (OSError, ValueError) as e:
    raise EvalConfigError(f"similarity.siglip_dir: {errors.one_line(e, limit=300)}") from None


def make_gens(config):
  from frameselect_jax import mllm

  g = config.gens
  if not g.base_url or not g.model:
    raise EvalConfigError(
      "gens_top_k and gens_nms need gens.base_url and gens.model (GenS's server)"
    )
  return mllm.OpenAIBackend(
    g.base_url, g.model, g.api_key or None, timeout_s=g.timeout_s, retries=g.retries
  )


def make_judge(config):
  j = config.judge
  if not j.base_url:
    return None
  from frameselect_jax import mllm

  return mllm.OpenAIBackend(j.base_url, j.model, j.api_key or None, timeout_s=j.timeout_s)


# --- Stages ---


def decode(item, config):
  """(candidates or None, status, seconds)."""
  start = time.perf_counter()
  try:
    candidates = video.decode_candidates(
      item.video,
      n=config.num_candidates,
      size=config.decode.image_size,
      backend=config.decode.backend,
      span=item.span,
      frame_rate=item.frame_rate,
    )
  except video.VideoError as e:
    return None, f"{STATUS_UNDECODABLE}: {errors.one_line(e)}", time.perf_counter() - start
  return candidates, STATUS_OK, time.perf_counter() - start


def random_pick(valid, k, seed, qid):
  import jax

  key = jax.random.key(zlib.crc32(f"{seed}/{qid}".encode()))
  return np.asarray(selection.random_k(valid, k, key))


# strategy -> (where its scores come from, how it picks k of them); uniform and random need
# no scores, file:<path> strategies read a selection file.
SCORED_STRATEGIES = {
  "pixel_diff": ("pixels", "top_k"),
  "top_k": ("selector", "top_k"),
  "nms_greedy": ("selector", "nms_greedy"),
  "siglip_top_k": ("siglip", "top_k"),
  "siglip_nms": ("siglip", "nms_greedy"),
  "bolt": ("siglip", "bolt"),
  "aks": ("siglip", "aks"),
  "gens_top_k": ("gens", "top_k"),
  "gens_nms": ("gens", "nms_greedy"),
}


class Scorers:
  """The per-candidate scores each source gives an item, computed once per item."""

  def __init__(self, config, selector=None, siglip=None, gens=None):
    self.config, self.selector, self.siglip, self.gens = config, selector, siglip, gens

  def __call__(self, source, item, candidates):
    """(scores float[n] or None, a fallback reason or None)."""
    if source == "pixels":
      return selection.frame_difference_scores(candidates.frames, candidates.valid), None
    if source == "selector":
      from frameselect_jax import text

      entry = self.selector.visual_tokens(
        item.video, self.config.num_candidates, span=item.span, frame_rate=item.frame_rate
      )
      if not np.array_equal(entry.valid, candidates.valid):
        raise EvalConfigError(f"{item.qid}: the selector's candidates differ from the harness's")
      return self.selector.score([entry], [text.question_prompt(item.question, item.options)])[
        0
      ], None
    if source == "siglip":
      query = item.question
      if self.config.similarity.with_options and item.options:
        query += " " + " ".join(item.options)
      return self.siglip.scores(
        candidates.frames, candidates.valid, query, key=(item.video, item.span)
      ), None
    return self.gens_scores(item, candidates)

  def gens_scores(self, item, candidates):
    """GenS names the helpful frames of the numbered candidates; an answer that cannot be read
    falls back to uniform picks (the reason is recorded and counted, never silent)."""
    from frameselect_jax import mllm, peers

    valid = np.flatnonzero(candidates.valid)
    parts = []
    for i in valid:
      parts += [f"[{int(i)}]", candidates.frames[i]]
    parts.append(f"Question: {item.question}\n{peers.GENS_INSTRUCTION}")
    try:
      reply = self.gens.ask(parts, max_tokens=self.config.gens.max_tokens)
      relevance = peers.parse_gens(reply, len(candidates.valid))
    except (ValueError, mllm.BackendError) as e:
      return None, f"uniform: GenS's answer could not be used ({errors.one_line(e)})"
    if not relevance:
      return None, "uniform: GenS named no frame"
    return peers.gens_scores(relevance, len(candidates.valid)), None


def pick(method, scores, valid, k, config):
  from frameselect_jax import peers

  if method == "bolt":
    return peers.bolt(scores, valid, k, power=config.peers.bolt_power)
  if method == "aks":
    return peers.aks(
      scores, valid, k, threshold=config.peers.aks_threshold, depth=config.peers.aks_depth
    )
  return np.asarray(selection.select(method, scores, valid, k))


def select_all(item, candidates, strategies, ks, scorers, external, config):
  """{(strategy, k): (indices, scores or None, seconds, fallback or None)} for this item. A
  score source's time is shared by the (strategy, k) pairs that use it."""
  out = {}
  valid = candidates.valid
  sources = {}  # source -> (scores, fallback, seconds, pairs using it)
  for strategy in strategies:
    if strategy in SCORED_STRATEGIES:
      source = SCORED_STRATEGIES[strategy][0]
      if source not in sources:
        start = time.perf_counter()
        scores, fallback = scorers(source, item, candidates)
        sources[source] = [scores, fallback, time.perf_counter() - start, 0]
      sources[source][3] += len(ks)
  for strategy in strategies:
    for k in ks:
      start = time.perf_counter()
      scores = fallback = share = None
      if strategy.startswith("file:"):
        record = external.get((item.qid, k))
        if record is None:
          continue  # reported: the file has no selection for this question and k
        picks = np.asarray(record["indices"], np.int64)
      elif strategy == "random":
        picks = random_pick(valid, k, config.seed, item.qid)
      elif strategy == "uniform":
        picks = np.asarray(selection.uniform(valid, k))
      else:
        source, method = SCORED_STRATEGIES[strategy]
        scores, fallback, seconds, users = sources[source]
        share = seconds / users
        if scores is None:  # the source failed for this item: uniform, and the reason recorded
          picks = np.asarray(selection.uniform(valid, k))
        else:
          picks = pick(method, scores, valid, k, config)
      picks = picks[picks >= 0]
      seconds = time.perf_counter() - start + (share or 0.0)
      out[(strategy, k)] = (picks, scores, seconds, fallback)
  return out


def selection_record(item, candidates, strategy, k, picks, scores) -> dict:
  record = {
    "qid": item.qid,
    "video_id": item.video_id or item.video,
    "benchmark": item.benchmark,
    "strategy": strategy,
    "n": len(candidates.valid),
    "k": k,
    "indices": [int(i) for i in picks],
    "timestamps": [float(candidates.timestamps[i]) for i in picks],
  }
  if scores is not None:
    record["scores"] = [float(s) if v else None for s, v in zip(scores, candidates.valid)]
  return record


def score_answer(item, text, judge, judge_cache) -> dict:
  """{"choice", "correct", "scorable", "parsed", ...} for one answer."""
  if item.options:
    choice = answers.parse_choice(text, item.options)
    scorable = item.answer_index is not None
    return {
      "choice": choice,
      "parsed": choice is not None,
      "correct": bool(scorable and choice == item.answer_index),
      "scorable": scorable,
    }
  if judge is None or not item.answer:
    return {"parsed": True, "correct": False, "scorable": False, "judge": None}
  key = downstream.ResponseCache.key(judge.model, f"{item.question}|{item.answer}|{text}", [], [])
  verdict = judge_cache.get(key)
  if verdict is None:
    reply = judge.chat(answers.judge_messages(item.question, item.answer, text), max_tokens=64)
    verdict = {"reply": reply, "judgement": answers.parse_judgement(reply)}
    judge_cache.put(key, verdict)
  judgement = verdict["judgement"]
  if judgement is None:
    return {"parsed": False, "correct": False, "scorable": True, "judge": verdict["reply"]}
  yes, score = judgement
  return {"parsed": True, "correct": bool(yes), "scorable": True, "judge_score": int(score)}


# --- The run ---


def output_dir(config, shard) -> str:
  i, n = shard
  base = os.path.abspath(config.output)
  return base if n == 1 else os.path.join(base, f"shard-{i}-of-{n}")


def run(config, shard=(0, 1)) -> str:
  """Evaluates this shard's items; returns its output folder (report written)."""
  from tqdm import tqdm

  from eval import report

  strategies = parse_strategies(config.strategies)
  ks = parse_ks(config.ks, config.num_candidates)
  out = output_dir(config, shard)
  errors.check_can_create(out, "output")
  try:
    items = videoqa.load(
      config.benchmark, config.root, config.split or None, config.videos_dir or None
    )
  except videoqa.AnnotationError as e:
    raise EvalConfigError(str(e)) from None
  external_picks = {}  # (qid, k) -> record, from the first selection file that has it
  for name in strategies:
    if name.startswith("file:"):
      try:
        records = selection_file.read(name[5:])
      except (OSError, ValueError) as e:
        raise EvalConfigError(f"strategy {name}: {errors.one_line(e)}") from None
      for r in records:
        external_picks.setdefault((r["qid"], r["k"]), r)
  selector = make_selector(config) if any(s in SELECTOR_STRATEGIES for s in strategies) else None
  siglip = make_siglip(config) if any(s in SIGLIP_STRATEGIES for s in strategies) else None
  gens = make_gens(config) if any(s in GENS_STRATEGIES for s in strategies) else None
  scorers = Scorers(config, selector, siglip, gens)
  os.makedirs(out, exist_ok=True)
  model = make_downstream(config)
  cache = downstream.ResponseCache(os.path.join(out, "cache") if config.downstream.cache else None)
  judge = make_judge(config)
  mine = errors.take_shard(items, shard)
  problems = collections.defaultdict(list)
  for p in items.problems:
    problems[p.qid].append(p)
  errors.write_atomically(
    os.path.join(out, "config.json"), json.dumps(report.redacted_config(config), indent=1)
  )
  selections_path = os.path.join(out, "selections.jsonl")
  results_path = os.path.join(out, "results.jsonl")
  for path in (selections_path, results_path):
    jsonl.drop_partial_line(path)
  made = {(r["qid"], r["strategy"], r["k"]): r for r in _read(selections_path)}
  done = {(r["qid"], r["strategy"], r["k"]) for r in _read(results_path)}
  result_lines, selection_lines = jsonl.Appender(results_path), jsonl.Appender(selections_path)
  wanted = [(s, k) for s in strategies for k in ks]

  def todo(item):
    return [(s, k) for s, k in wanted if (item.qid, s, k) not in done]

  decode_pool = concurrent.futures.ThreadPoolExecutor(max(1, config.decode.workers))
  answer_pool = concurrent.futures.ThreadPoolExecutor(max(1, config.downstream.concurrency))
  pending_items = [item for item in mine if todo(item)]
  ahead = collections.deque()
  answering = collections.deque()
  bar = tqdm(total=len(pending_items), desc="items", unit="item", disable=not config.progress)
  decoded_bar = tqdm(
    total=len(pending_items), desc="decoded", unit="item", disable=not config.progress
  )
  answered = tqdm(
    total=sum(len(todo(item)) for item in pending_items),
    desc="answers",
    unit="answer",
    disable=not config.progress,
  )

  def finish(block: bool):
    while answering and (block or answering[0].done()):
      result_lines.write([answering.popleft().result()])
      answered.update(1)

  def answer_one(item, strategy, k, picks, candidates, base):
    start = time.perf_counter()
    frames = candidates.frames[picks]
    stamps = candidates.timestamps[picks]
    key = cache.key(
      model.name + "|" + model.template, f"{item.question}|{item.options}", frames, stamps
    )
    reply = cache.get(key)
    if reply is None:
      reply = model.answer(frames, stamps, item.question, item.options)
      cache.put(key, reply)
    scored = score_answer(item, reply["text"], judge, cache)
    return {
      **base,
      "strategy": strategy,
      "k": k,
      "frames": len(picks),
      "answer": reply["text"],
      "prompt_tokens": reply["prompt_tokens"],
      "completion_tokens": reply["completion_tokens"],
      "answer_s": time.perf_counter() - start,
      **scored,
    }

  decoding = {}  # (video, span, frame rate) -> future: questions about one video share it

  def submit(item):
    key = (item.video, item.span, item.frame_rate)
    if key in decoding:
      return key, decoding[key], False
    decoding[key] = decode_pool.submit(decode, item, config)
    decoding[key].add_done_callback(lambda _: decoded_bar.update(1))
    while len(decoding) > 2 * (config.decode.prefetch + 1):  # forget the oldest decoded
      del decoding[next(iter(decoding))]
    return key, decoding[key], True

  # The main thread's time: selecting, waiting on the other stages, and the rest (the
  # harness's own work: records, lines, bookkeeping), which report.json gives as overhead.
  clock = {"loop": time.perf_counter(), "selecting": 0.0, "waiting": 0.0}
  try:
    feed = iter(pending_items)
    for item in feed:
      ahead.append((item, *submit(item)))
      if len(ahead) > config.decode.prefetch:
        break
    while ahead:
      item, key, future, first = ahead.popleft()
      nxt = next(feed, None)
      if nxt is not None:
        ahead.append((nxt, *submit(nxt)))
      base = {
        "benchmark": item.benchmark,
        "qid": item.qid,
        "category": item.category,
        "open_ended": item.open_ended,
      }
      missing = [p for p in problems.get(item.qid, []) if p.kind == videoqa.MISSING_VIDEO]
      if missing:
        candidates, status, decode_s = None, f"{STATUS_MISSING}: {missing[0].reason}", 0.0
      else:
        waited = time.perf_counter()
        candidates, status, decode_s = future.result()
        clock["waiting"] += time.perf_counter() - waited
        decode_s = decode_s if first else 0.0  # counted once per video
      base.update(status=status, decode_s=decode_s)
      if candidates is None:
        for strategy, k in todo(item):
          line = {**base, "strategy": strategy, "k": k, "correct": False, "scorable": False}
          line["parsed"] = False
          result_lines.write([line])
          answered.update(1)
        bar.update(1)
        continue
      selecting = time.perf_counter()
      # What a resumed run selected already is reused as it is (no second GenS call).
      unmade = [s for s in strategies if any((item.qid, s, k) not in made for k in ks)]
      picked = select_all(item, candidates, unmade, ks, scorers, external_picks, config)
      new = [
        {
          **selection_record(item, candidates, s, k, p, sc),
          "select_s": seconds,
          **({"fallback": fallback} if fallback else {}),
        }
        for (s, k), (p, sc, seconds, fallback) in picked.items()
        if (item.qid, s, k) not in made
      ]
      clock["selecting"] += time.perf_counter() - selecting
      selection_lines.write(selection_file.check(r) for r in new)
      chosen_of = {(r["strategy"], r["k"]): r for r in new}
      chosen_of.update(
        {(s, k): made[item.qid, s, k] for s, k in wanted if (item.qid, s, k) in made}
      )
      for strategy, k in todo(item):
        record = chosen_of.get((strategy, k))
        if record is None:
          line = {**base, "strategy": strategy, "k": k, "status": "no selection"}
          result_lines.write([{**line, "correct": False, "scorable": False, "parsed": False}])
          answered.update(1)
          continue
        line = {**base, "select_s": record.get("select_s", 0.0)}
        if record.get("fallback"):
          line["fallback"] = record["fallback"]
        chosen = np.asarray(record["indices"], np.int64)
        answering.append(
          answer_pool.submit(answer_one, item, strategy, k, chosen, candidates, line)
        )
      while len(answering) > 4 * max(1, config.downstream.concurrency):  # bounded backlog
        waited = time.perf_counter()
        answering[0].result()
        clock["waiting"] += time.perf_counter() - waited
        finish(block=False)
      finish(block=False)
      bar.update(1)
    waited = time.perf_counter()
    finish(block=True)
    clock["waiting"] += time.perf_counter() - waited
    clock["loop"] = time.perf_counter() - clock["loop"]
  finally:
    decode_pool.shutdown(wait=False, cancel_futures=True)
    answer_pool.shutdown(wait=True, cancel_futures=True)
    result_lines.close()
    selection_lines.close()
    decoded_bar.close()
    bar.close()
    answered.close()
  overhead = clock["loop"] - clock["selecting"] - clock["waiting"]
  started = time.perf_counter()
  report.write(
    out,
    config,
    extra={
      "cache_hits": cache.hits,
      "shard": list(shard),
      "main_thread_s": {**clock, "overhead": overhead},
    },
  )
  # Written once more with the time the report itself took (a second, cheap pass).
  clock["report"] = time.perf_counter() - started
  _add_to_report(out, {"main_thread_s": {**clock, "overhead": overhead}})
  return out


def _add_to_report(out, values: dict):
  path = os.path.join(out, "report.json")
  with open(path) as f:
    everything = json.load(f)
  everything.update(values)
  errors.write_atomically(path, json.dumps(everything, indent=1))


def _read(path):
  return jsonl.read(path) if os.path.exists(path) else []


def merge(inputs, output, config) -> str:
  """Joins shard outputs (their selections and results) into `output` and writes its report."""
  from eval import report

  if not inputs:
    raise EvalConfigError("merge needs --inputs=<shard folder>,<shard folder>,...")
  os.makedirs(output, exist_ok=True)
  for name in ("selections.jsonl", "results.jsonl"):
    lines, seen = [], set()
    for folder in inputs:
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise EvalConfigError(f"--inputs: {path}: no such file")
      for line in jsonl.read(path):
        key = (line["qid"], line["strategy"], line["k"])
        if key not in seen:
          seen.add(key)
          lines.append(line)
    errors.write_atomically(
      os.path.join(output, name), "".join(json.dumps(x) + "\n" for x in lines)
    )
  with open(os.path.join(inputs[0], "config.json")) as f:
    saved = f.read()
  errors.write_atomically(os.path.join(output, "config.json"), saved)
  report.write(output, config, extra={"merged_from": [os.path.abspath(x) for x in inputs]})
  return output
