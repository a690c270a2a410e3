"""Metrics out: a JSONL file (one object per line) and TensorBoard event files.

Only process 0 writes. A resumed run appends to the same JSONL, after a {"event": "resume"}
line, so the last line of a step is the one that counts.
"""

from __future__ import annotations

import json
import os
import time


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(self.jsonl_path, "a", buffering=1)
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def event(self, name: str, **fields):
    if self.enabled:
      self.jsonl.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")

  def scalars(self, step: int, values: dict):
    if not self.enabled:
      return
    clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in values.items()}
    self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    for key, value in clean.items():
      if not isinstance(value, str):
        self.tb.add_scalar(key, value, step)

  def flush(self):
    if self.enabled:
      self.jsonl.flush()
      self.tb.flush()

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
