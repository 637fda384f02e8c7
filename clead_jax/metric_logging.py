"""Training metrics to DIR/metrics.jsonl and TensorBoard event files (DIR/tensorboard).

Only process 0 writes; other processes get a writer that does nothing. Event files are written
with tensorboardX, which does not import TensorFlow (an import that costs seconds per start).
"""

import json
import os


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tensorboard = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
