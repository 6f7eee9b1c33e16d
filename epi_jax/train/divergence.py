"""Divergence of a run, judged from the training loss at every logged step.

A run has diverged at a logged step when its loss there

- is not finite (NaN or infinite), or
- has stayed above ``FACTOR`` x ln(vocab_size) at ``PATIENCE`` logged steps in a row, or
- has stayed at ln(vocab_size), within a relative ``FLAT``, at ``PATIENCE`` logged steps in a
  row: the model predicts the uniform distribution for every token of every batch.

ln(vocab_size) is the loss of the uniform guess: a freshly initialized decoder starts near it, a
pretrained one below it, and a model that learns never sits at twice that loss for long, nor on
it to five digits across batches. Blown-up parameters show as one of the three. Measured on
the demo config (vocab 320, 2 ln 320 = 11.5): a learning rate of 1e6 gives NaN from the first
logged step, 1e2 a loss of 1e4-1e6, 1.0 one of 12-84 before it comes down; on the tests' tiny
config (clipped Adam, 3 steps per stage) 1e6 leaves the loss flat at ln 320 = 5.7683 from step 2.
"""

from __future__ import annotations

import math

FACTOR = 2.0
"""A logged loss above ``FACTOR`` x ln(vocab_size) counts towards divergence."""
FLAT = 1e-5
"""A logged loss within ``FLAT`` x ln(vocab_size) of ln(vocab_size) counts towards divergence."""
PATIENCE = 3
"""Consecutive logged steps above the threshold (or flat at ln vocab_size) that diverge."""
EXIT_DIVERGED = 3
"""Exit code of the trainer when ``train.on_divergence: stop`` stopped a run."""


class TrainingDiverged(Exception):
  """A run stopped by ``train.on_divergence: stop``; the message is one line."""


class Divergence:
  """Watches the loss of each logged step; ``update`` reports the first divergence.

  >>> check = Divergence(vocab_size=256)
  >>> check.update(10, 5.5), check.update(20, float("nan"))["reason"]
  (None, 'loss is nan')
  """

  def __init__(self, vocab_size: int, *, factor: float = FACTOR, patience: int = PATIENCE):
    self.uniform = math.log(vocab_size)
    self.threshold = factor * self.uniform
    self.factor, self.patience = factor, patience
    self.above = self.flat = 0  # logged steps in a row above the threshold, at ln vocab_size
    self.event: dict | None = None
    """The first divergence, ``{"step", "loss", "reason"}``; None while there is none."""

  def update(self, step: int, loss: float) -> dict | None:
    """The divergence that logged ``step`` with ``loss`` completes, if it is the first."""
    if self.event is not None:
      return None
    self.above = self.above + 1 if loss > self.threshold else 0
    self.flat = self.flat + 1 if abs(loss - self.uniform) <= FLAT * self.uniform else 0
    if not math.isfinite(loss):
      reason = f"loss is {loss}"
    elif self.above == self.patience:
      reason = f"loss above {self.threshold:.4g} ({self.factor:g} x ln vocab_size)"
    elif self.flat == self.patience:
      reason = f"loss flat at ln vocab_size = {self.uniform:.4g} (uniform predictions)"
    else:
      return None
    if math.isfinite(loss):
      reason += f" at {self.patience} logged steps in a row"
    self.event = {"step": step, "loss": loss, "reason": reason}
    return self.event
