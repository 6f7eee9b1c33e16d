"""A plain NumPy float64 reference of EPI (Algorithm 1 of arXiv 2604.14010).

Deliberately naive: every leaf is flattened into one float64 vector, groups are an
integer id per entry, the threshold comes from a full ``np.sort``. Only the static
grouping (``epi_jax.layer_groups(...).leaf_ids``) and ``num_protected`` (k = floor(p d)
with p read as a decimal) are taken from the library; every number is computed here.

The semantics follow DESIGN.md, "The optimizer contract":
  t starts at 1; S_t = beta S_{t-1} + (1 - beta) g_t^2 from the raw gradients (a leaf
  whose gradient holds a non-finite entry keeps its S for that step); if t % H == 0 the
  mask is recomputed from S_t and applies to this step; the update is the AdamW update
  times (1 - m_t).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from epi_jax._src.selection import num_protected


def entry_groups(shapes, leaf_ids) -> np.ndarray:
  """Group id of every entry of the flattened leaves (-1: not eligible)."""
  out = []
  for shape, ids in zip(shapes, leaf_ids):
    shape = tuple(shape)
    if ids is None:
      g = np.full(shape, -1, np.int64)
    elif isinstance(ids, (int, np.integer)):
      g = np.full(shape, int(ids), np.int64)
    else:
      col = np.asarray(ids, np.int64).reshape((len(ids),) + (1,) * (len(shape) - 1))
      g = np.broadcast_to(col, shape)
    out.append(np.asarray(g).ravel())
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


def flatten(leaves) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def unflatten(vec: np.ndarray, shapes) -> list[np.ndarray]:
  out, start = [], 0
  for shape in shapes:
    size = int(np.prod(shape, dtype=np.int64))
    out.append(vec[start : start + size].reshape(shape))
    start += size
  assert start == vec.size
  return out


def normalize_scores(
    scores: np.ndarray, gid: np.ndarray, num_groups: int, normalize: str
) -> np.ndarray:
  """Eq. 7-8 in float64: per-group min-max (0 where max == min), or the raw scores."""
  scores = np.asarray(scores, np.float64)
  out = np.zeros_like(scores)
  if normalize == "none":
    out[gid >= 0] = scores[gid >= 0]
    return out
  assert normalize == "layer_minmax", normalize
  for g in range(num_groups):
    sel = gid == g
    if not sel.any():
      continue
    lo, hi = scores[sel].min(), scores[sel].max()
    out[sel] = (scores[sel] - lo) / (hi - lo) if hi > lo else 0.0
  return out


def select(
    scores: np.ndarray,
    gid: np.ndarray,
    num_groups: int,
    p: float,
    *,
    normalize: str = "layer_minmax",
    budget: str = "global",
):
  """Top-p selection (Eq. 9) by a full sort.

  Returns (mask, thresholds): mask is a bool vector like ``scores``; thresholds holds
  the k-th largest normalized score per budget (one for "global", one per group for
  "per_layer"), ``inf`` where k == 0.
  """
  score = normalize_scores(scores, gid, num_groups, normalize)
  if budget == "global":
    budgets = [gid >= 0]
  else:
    assert budget == "per_layer", budget
    budgets = [gid == g for g in range(num_groups)]
  mask = np.zeros(score.shape, bool)
  thresholds = np.full((len(budgets),), np.inf)
  for b, sel in enumerate(budgets):
    d = int(sel.sum())
    k = num_protected(p, d)
    if k == 0:
      continue
    tau = np.sort(score[sel])[::-1][k - 1]
    thresholds[b] = tau
    mask[sel] = (score[sel] >= tau) & (score[sel] > 0)
  return mask, thresholds


def select_tree(leaves, leaf_ids, num_groups, p, *, normalize="layer_minmax", budget="global"):
  """``select`` on a list of leaves; returns (list of bool masks, thresholds)."""
  shapes = [np.shape(x) for x in leaves]
  gid = entry_groups(shapes, leaf_ids)
  vec = np.concatenate(
      [
          np.asarray(x, np.float64).ravel()
          if ids is not None
          else np.zeros(int(np.prod(s, dtype=np.int64)))
          for x, ids, s in zip(leaves, leaf_ids, shapes)
      ]
  )
  mask, tau = select(vec, gid, num_groups, p, normalize=normalize, budget=budget)
  return unflatten(mask, shapes), tau


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  union = int(np.sum(a | b))
  return 1.0 if union == 0 else int(np.sum(a & b)) / union


@dataclasses.dataclass
class RefStats:
  refreshes: int
  last_refresh: int
  threshold: np.ndarray
  protected: np.ndarray
  locked: np.ndarray
  freed: np.ndarray
  overlap_first: float
  overlap_prev: float


class ReferenceEPI:
  """EPI around optax.adamw(learning_rate, b1, b2, eps, eps_root=0, weight_decay), float64.

  ``step(grads)`` takes a list of gradient leaves (in ``jax.tree.leaves`` order),
  returns the list of update leaves and advances ``params`` (float64 leaves).
  """

  def __init__(
      self,
      params,
      leaf_ids,
      num_groups,
      *,
      learning_rate,
      weight_decay,
      p,
      beta,
      interval,
      normalize="layer_minmax",
      budget="global",
      sensitivity="grad_sq",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
  ):
    self.shapes = [np.shape(x) for x in params]
    self.gid = entry_groups(self.shapes, leaf_ids)
    self.num_groups = num_groups
    self.hp = dict(lr=learning_rate, wd=weight_decay, b1=b1, b2=b2, eps=eps)
    self.p, self.beta, self.interval = p, beta, interval
    self.normalize, self.budget, self.sensitivity = normalize, budget, sensitivity
    self.param = flatten(params)
    n = self.param.size
    self.mu = np.zeros(n)
    self.nu = np.zeros(n)
    self.s = np.zeros(n)
    self.mask = np.zeros(n, bool)
    self.first = None  # first non-empty mask
    self.t = 0
    self.stats = None

  @property
  def params(self):
    return unflatten(self.param, self.shapes)

  @property
  def protection_mask(self):
    return unflatten(self.mask, self.shapes)

  @property
  def scores(self):
    """The sensitivity S_t (the AdamW nu with sensitivity="adam_nu")."""
    return unflatten(self.nu if self.sensitivity == "adam_nu" else self.s, self.shapes)

  def adamw(self, g: np.ndarray) -> np.ndarray:
    hp = self.hp
    self.mu = hp["b1"] * self.mu + (1 - hp["b1"]) * g
    self.nu = hp["b2"] * self.nu + (1 - hp["b2"]) * g * g
    mu_hat = self.mu / (1 - hp["b1"] ** self.t)
    nu_hat = self.nu / (1 - hp["b2"] ** self.t)
    return -hp["lr"] * (mu_hat / (np.sqrt(nu_hat) + hp["eps"]) + hp["wd"] * self.param)

  def ema(self, grads) -> None:
    new = []
    for s, g in zip(unflatten(self.s, self.shapes), grads):
      g = np.asarray(g, np.float64)
      with np.errstate(invalid="ignore", over="ignore"):
        ema = self.beta * s + (1 - self.beta) * g * g
      # A non-finite gradient never poisons S: such an entry keeps S_{t-1}.
      new.append(np.where(np.isfinite(ema), ema, s))
    self.s = np.concatenate([x.ravel() for x in new])

  def refresh(self) -> None:
    scores = self.nu if self.sensitivity == "adam_nu" else self.s
    new, tau = select(
        scores, self.gid, self.num_groups, self.p, normalize=self.normalize, budget=self.budget
    )
    old = self.mask
    per_group = lambda m: np.array(
        [int(np.sum(m & (self.gid == g))) for g in range(self.num_groups)]
    )
    prev = self.stats
    self.stats = RefStats(
        refreshes=(prev.refreshes if prev else 0) + 1,
        last_refresh=self.t,
        threshold=tau,
        protected=per_group(new),
        locked=per_group(new & ~old),
        freed=per_group(~new & old),
        overlap_first=1.0 if self.first is None else jaccard(new, self.first),
        overlap_prev=jaccard(new, old),
    )
    if self.first is None and new.any():
      self.first = new.copy()
    self.mask = new

  def step(self, grads):
    self.t += 1
    g = flatten(grads)
    self.ema(grads)
    update = self.adamw(g)
    if self.t % self.interval == 0:
      self.refresh()
    update = update * (1 - self.mask)
    self.param = self.param + update
    return unflatten(update, self.shapes)
