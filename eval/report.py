"""The report of an evaluation run, from its results.jsonl and selections.jsonl.

- report.json: every number (accuracy over all items and over the scorable ones, with 95%
  bootstrap intervals; paired differences against the baseline strategy at the same k with
  their paired-bootstrap intervals and McNemar's test; breakdowns by each category field;
  cost per question; unparseable answers listed), plus the config, package versions, git
  commit, seeds and the SHA-256 of the selection file;
- report.md: the same as tables;
- accuracy_vs_frames.png: accuracy against k per strategy, with intervals.

A missing or undecodable video counts in the all-items denominator (never correct); the
scorable accuracy leaves out what could not be scored, and both counts are given.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess

import numpy as np

from eval import stats
from frameselect_jax import errors, jsonl

PACKAGES = ("frameselect_jax", "jax", "flax", "numpy", "transformers", "openai")


def _versions() -> dict:
  from importlib import metadata

  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def _git_commit() -> str | None:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _sha256(path) -> str | None:
  if not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _interval(values, resamples, seed):
  if len(values) == 0:
    return {"accuracy": None, "low": None, "high": None}
  mean, low, high = stats.bootstrap_interval(values, resamples=resamples, seed=seed)
  return {"accuracy": mean, "low": low, "high": high}


def summarize(results: list[dict], baseline: str, resamples: int, seed: int) -> dict:
  """Every number of the report, from the result lines."""
  groups = collections.defaultdict(list)
  for line in results:
    groups[(line["strategy"], line["k"])].append(line)
  qids = sorted({line["qid"] for line in results})
  table = []
  for (strategy, k), lines in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    correct = np.array([bool(x["correct"]) for x in lines], float)
    scorable = np.array([bool(x.get("scorable")) for x in lines])
    ok = [x for x in lines if str(x.get("status", "ok")) == "ok"]
    unparseable = [x["qid"] for x in lines if x.get("scorable") and not x.get("parsed", True)]
    row = {
      "strategy": strategy,
      "k": k,
      "items": len(lines),
      "scorable": int(scorable.sum()),
      "missing_video": sum(1 for x in lines if str(x.get("status", "")).startswith("missing")),
      "undecodable": sum(1 for x in lines if str(x.get("status", "")).startswith("undecodable")),
      "unparseable": len(unparseable),
      "unparseable_qids": unparseable,
      # A score source that failed (GenS's answer unreadable): uniform picks instead.
      "fallbacks": sum(1 for x in lines if x.get("fallback")),
      "all": _interval(correct, resamples, seed),
      "over_scorable": _interval(correct[scorable], resamples, seed),
      "cost": {
        "decode_s": float(np.mean([x.get("decode_s", 0.0) for x in ok])) if ok else 0.0,
        "select_ms": 1000 * float(np.mean([x.get("select_s", 0.0) for x in ok])) if ok else 0.0,
        "answer_s": float(np.mean([x.get("answer_s", 0.0) for x in ok])) if ok else 0.0,
        "prompt_tokens": float(np.mean([x.get("prompt_tokens", 0) for x in ok])) if ok else 0.0,
      },
      "breakdown": {},
    }
    fields = sorted({f for x in lines for f in (x.get("category") or {})})
    for field in fields:
      by_value = collections.defaultdict(list)
      for x in lines:
        if x.get("scorable") and field in (x.get("category") or {}):
          by_value[str(x["category"][field])].append(float(bool(x["correct"])))
      row["breakdown"][field] = {
        value: {"accuracy": float(np.mean(v)), "items": len(v)}
        for value, v in sorted(by_value.items())
      }
    table.append(row)
  paired = []
  for (strategy, k), lines in sorted(groups.items()):
    if strategy == baseline or (baseline, k) not in groups:
      continue
    mine = {x["qid"]: bool(x["correct"]) for x in lines}
    theirs = {x["qid"]: bool(x["correct"]) for x in groups[(baseline, k)]}
    both = sorted(set(mine) & set(theirs))
    a = np.array([mine[q] for q in both], float)
    b = np.array([theirs[q] for q in both], float)
    diff, low, high = stats.paired_bootstrap(a, b, resamples=resamples, seed=seed)
    paired.append(
      {
        "strategy": strategy,
        "baseline": baseline,
        "k": k,
        "questions": len(both),
        "difference": diff,
        "low": low,
        "high": high,
        "mcnemar": stats.mcnemar(a.astype(bool), b.astype(bool)),
      }
    )
  return {"questions": len(qids), "table": table, "paired": paired}


def _pct(x):
  return "-" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict, meta: dict) -> str:
  lines = [
    f"# {meta['benchmark']} ({meta['split'] or 'default split'}): {summary['questions']} questions",
    "",
    f"Downstream: {meta['downstream']}. Judge (open-ended): {meta['judge'] or 'none'}. "
    f"Intervals: 95% bootstrap ({meta['resamples']} resamples).",
    "",
    "| strategy | k | accuracy (all) | 95% CI | accuracy (scorable) | scorable / items | "
    "missing | undecodable | unparseable | select ms | decode s | answer s | tokens |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in summary["table"]:
    a, s, c = r["all"], r["over_scorable"], r["cost"]
    lines.append(
      f"| {r['strategy']} | {r['k']} | {_pct(a['accuracy'])} | {_pct(a['low'])}-{_pct(a['high'])} "
      f"| {_pct(s['accuracy'])} | {r['scorable']} / {r['items']} | {r['missing_video']} | "
      f"{r['undecodable']} | {r['unparseable']} | {c['select_ms']:.1f} | {c['decode_s']:.3f} | "
      f"{c['answer_s']:.3f} | {c['prompt_tokens']:.0f} |"
    )
  if summary["paired"]:
    lines += [
      "",
      "## Paired against the baseline (same questions)",
      "",
      "| strategy | baseline | k | difference (points) | 95% CI | McNemar p | only strategy right "
      "| only baseline right |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["paired"]:
      m = p["mcnemar"]
      lines.append(
        f"| {p['strategy']} | {p['baseline']} | {p['k']} | {100 * p['difference']:+.1f} | "
        f"{100 * p['low']:+.1f} to {100 * p['high']:+.1f} | {m['p_value']:.3g} | "
        f"{m['a_only']} | {m['b_only']} |"
      )
  for r in summary["table"]:
    for field, values in r["breakdown"].items():
      if len(values) < 2:
        continue
      lines += [
        "",
        f"### {r['strategy']}, k={r['k']}, by {field}",
        "",
        "| value | accuracy | items |",
      ]
      lines += ["|---|---|---|"]
      lines += [f"| {v} | {_pct(x['accuracy'])} | {x['items']} |" for v, x in values.items()]
  fallbacks = [r for r in summary["table"] if r["fallbacks"]]
  if fallbacks:
    lines += ["", "## Fallbacks (the strategy's scores failed; uniform picks were answered)", ""]
    lines += [f"- {r['strategy']} k={r['k']}: {r['fallbacks']} questions" for r in fallbacks]
  unparseable = [
    (r["strategy"], r["k"], q) for r in summary["table"] for q in r["unparseable_qids"]
  ]
  if unparseable:
    lines += ["", "## Unparseable answers (counted wrong)", ""]
    lines += [f"- {s} k={k}: {q}" for s, k, q in unparseable[:200]]
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from frameselect_jax import plot as plot_lib

  by_strategy = collections.defaultdict(list)
  for r in summary["table"]:
    if r["all"]["accuracy"] is not None:
      by_strategy[r["strategy"]].append(r)
  figure, axes = plt.subplots(figsize=(6, 4))
  for strategy, rows in sorted(by_strategy.items()):
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    acc = np.array([100 * r["all"]["accuracy"] for r in rows])
    low = acc - np.array([100 * r["all"]["low"] for r in rows])
    high = np.array([100 * r["all"]["high"] for r in rows]) - acc
    axes.errorbar(ks, acc, yerr=[low, high], marker="o", capsize=3, label=strategy)
  axes.set_xscale("log", base=2)
  axes.set_xlabel("frames given to the downstream model (k)")
  axes.set_ylabel("accuracy, all items (%)")
  axes.set_title(f"accuracy against frames ({summary['questions']} questions, 95% CI)")
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  plot_lib.save_figure(figure, path)
  plt.close(figure)


def redacted_config(config) -> dict:
  """The config as JSON, without API keys."""
  values = json.loads(config.to_json_best_effort())
  for section in (values.get("downstream", {}).get("openai", {}), values.get("judge", {})):
    if "api_key" in section:
      section["api_key"] = "<not recorded>"
  return values


def write(out: str, config, extra: dict | None = None) -> dict:
  """Reads out/results.jsonl and writes report.json, report.md and accuracy_vs_frames.png."""
  results = jsonl.read(os.path.join(out, "results.jsonl"))
  summary = summarize(results, config.report.baseline, config.report.resamples, config.seed)
  meta = {
    "benchmark": config.benchmark,
    "split": config.split,
    "downstream": config.downstream.kind
    + (f" {config.downstream.openai.model}" if config.downstream.kind == "openai" else ""),
    "judge": config.judge.model if config.judge.base_url else None,
    "resamples": config.report.resamples,
  }
  everything = {
    **summary,
    "meta": meta,
    "config": redacted_config(config),
    "versions": _versions(),
    "git_commit": _git_commit(),
    "seeds": {"seed": config.seed, "bootstrap": config.seed},
    "selection_file_sha256": _sha256(os.path.join(out, "selections.jsonl")),
    **(extra or {}),
  }
  errors.write_atomically(os.path.join(out, "report.json"), json.dumps(everything, indent=1))
  errors.write_atomically(os.path.join(out, "report.md"), markdown(summary, meta))
  plot(summary, os.path.join(out, "accuracy_vs_frames.png"))
  return everything
