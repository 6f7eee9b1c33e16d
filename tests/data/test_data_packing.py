"""Best-fit-decreasing packing: the planner, row fill, once-per-epoch use, determinism, resume."""

import dataclasses
import json

import chex
import numpy as np
import pytest

from epi_jax.data.batching import Encoded, encode_chats
from epi_jax.data.iterator import BatchIterator, IteratorState
from epi_jax.data.packing import best_fit_decreasing
from shared_data import SHARED_DATA

SEQ, BATCH = 512, 8

# Token lengths like the SmolLM2 chat template gives each dataset (median, 90th percentile of
# the real records: GSM8K 204, 312; CodeAlpaca 105, 193; LogiQA 244, 331): log-normal draws.
LIKE = {"gsm8k": (204, 312, 90), "code_alpaca": (105, 193, 40), "logiqa": (244, 331, 100)}


def drawn_lengths(name, n, seed=0):
  median, p90, low = LIKE[name]
  sigma = np.log(p90 / median) / 1.2816
  rng = np.random.default_rng(seed)
  return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), low, 600).astype(int)


def tagged(lengths, seed=0):
  """Example i is ``len`` tokens all equal to i + 1, with a random response mask."""
  rng = np.random.default_rng(seed)
  return [Encoded(np.full(n, i + 1, np.int32), rng.random(n) < 0.5) for i, n in enumerate(lengths)]


def reference_best_fit(lengths, capacity, open_rows=()):
  """The planner written plainly: longest first, into the row with the least room that fits."""
  rows = [list(row) for row in open_rows]
  room = [capacity - sum(lengths[i] for i in row) for row in rows]
  placed = {i for row in rows for i in row}
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    if i in placed:
      continue
    fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
    if fits:
      r = min(fits, key=lambda r: (room[r], r))
    else:
      rows.append([]), room.append(capacity)
      r = len(rows) - 1
    rows[r].append(int(i))
    room[r] -= lengths[i]
  return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_the_plain_reference(seed):
  rng = np.random.default_rng(seed)
  lengths = [int(n) for n in rng.integers(1, 200, 120)]
  assert best_fit_decreasing(lengths, 256) == reference_best_fit(lengths, 256)
  open_rows = [[0, 1], [2], [3, 4, 5]]
  lengths[:6] = [30, 40, 250, 10, 20, 30]
  rows = best_fit_decreasing(lengths, 256, open_rows)
  assert rows == reference_best_fit(lengths, 256, open_rows) and rows[:3] == [
      r + row[len(r) :] for r, row in zip(open_rows, rows)
  ]
  assert sorted(i for row in rows for i in row) == list(range(120))
  assert all(sum(lengths[i] for i in row) <= 256 for row in rows)


def test_best_fit_decreasing_rejects_what_cannot_fit():
  with pytest.raises(ValueError, match="item 1 has length 9, outside"):
    best_fit_decreasing([3, 9], 8)
  with pytest.raises(ValueError, match="open row 0 holds 12 tokens, more than 8"):
    best_fit_decreasing([6, 6], 8, [[0, 1]])


def epoch_fill(examples, **settings):
  """Real tokens over batch cells for the batches of the first epoch."""
  it = BatchIterator(examples, batch_size=BATCH, seq_len=SEQ, pad_id=0, seed=0, **settings)
  real = []
  while it.state.epoch == 0:
    real.append(next(it)["attention_mask"].sum())
  return float(np.mean(real)) / (BATCH * SEQ)


@pytest.mark.parametrize("name", LIKE)
def test_packed_rows_are_95_percent_full(name):
  examples = tagged(drawn_lengths(name, 2000))
  assert epoch_fill(examples, pack=True) >= 0.95


def segments(batch):
  """(example index, length) of every packed example, row by row."""
  out = []
  for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
    for k in range(1, seg.max() + 1):
      tokens = ids[seg == k]
      assert (tokens == tokens[0]).all()
      out.append((int(tokens[0]) - 1, len(tokens)))
  return out


def test_every_example_is_used_once_per_epoch_at_most_one_window_late():
  lengths = np.random.default_rng(1).integers(20, 700, 300)  # some longer than SEQ: cut
  it = BatchIterator(tagged(lengths), batch_size=4, seq_len=SEQ, pad_id=0, seed=3, pack=True,
                     pack_window=64)  # fmt: skip
  seen, taken = np.zeros(len(lengths), int), np.zeros(len(lengths), int)
  windows, window_taken = 0, np.zeros(len(lengths), int)  # the window that took each example
  for _ in range(200):  # about five epochs
    before = it.state
    batch = next(it)
    pending = np.bincount([i for row in it.state.rows for i in row], minlength=len(lengths))
    if (it.state.epoch, it.state.index) != (before.epoch, before.index):  # a window was taken
      windows += 1
    for i, n in segments(batch):
      assert n == min(lengths[i], SEQ)
      seen[i] += 1
    now_taken = seen + pending
    window_taken[now_taken > taken] = windows
    taken = now_taken
    for i, _ in segments(batch):
      assert windows - window_taken[i] <= 1  # taken in this window or carried from the last
    epoch, index = it.state.epoch, it.state.index  # each epoch is a permutation:
    assert set(taken) <= {epoch, epoch + 1} and taken.sum() == epoch * len(lengths) + index
    assert len(it.state.rows) < 64 + 4  # at most a window's new rows and the carried ones
  assert it.state.epoch >= 4


def test_packing_is_deterministic_and_resumes_exactly_from_json():
  examples = tagged(drawn_lengths("gsm8k", 500))
  settings = dict(batch_size=BATCH, seq_len=SEQ, pad_id=0, seed=5, pack=True, pack_window=48)
  it = BatchIterator(examples, **settings)
  saved, batches = [], []
  for _ in range(70):  # many windows and two epoch boundaries (about 28 batches an epoch)
    saved.append(json.loads(json.dumps(dataclasses.asdict(it.state))))
    batches.append(next(it))
  fresh = BatchIterator(examples, **settings)
  chex.assert_trees_all_equal([next(fresh) for _ in range(70)], batches)
  resumed = BatchIterator(examples, **settings, state=IteratorState(**saved[33]))
  chex.assert_trees_all_equal([next(resumed) for _ in range(10)], batches[33:43])
  states = [IteratorState(**saved[k]) for k in range(0, 60, 7)]
  assert sum(bool(s.rows) for s in states) >= 6 and max(s.epoch for s in states) >= 1
  for k, state in zip(range(0, 60, 7), states):
    resumed.restore(state)
    chex.assert_trees_all_equal([next(resumed) for _ in range(10)], batches[k : k + 10])
  other = BatchIterator(examples, **{**settings, "seed": 6})
  assert not np.array_equal(next(other)["input_ids"], batches[0]["input_ids"])


def reference_layout(examples, rows, seq_len, pad_id):
  """The batch of ``rows`` (example indices) in float64 NumPy, built segment by segment."""
  out = {k: np.zeros((len(rows), seq_len)) for k in ("attention_mask", "segment_ids", "positions")}
  out["input_ids"] = np.full((len(rows), seq_len), float(pad_id))
  out["loss_mask"] = np.zeros((len(rows), seq_len))
  for b, row in enumerate(rows):
    ids = [examples[i].input_ids[:seq_len] for i in row]
    n = sum(map(len, ids))
    out["input_ids"][b, :n] = np.concatenate(ids)
    out["segment_ids"][b, :n] = np.repeat(np.arange(1, len(ids) + 1), [len(x) for x in ids])
    out["positions"][b, :n] = np.concatenate([np.arange(len(x)) for x in ids])
    out["attention_mask"][b, :n] = 1
    out["loss_mask"][b, :n] = np.concatenate(
        [np.r_[0.0, examples[i].loss_mask[1:seq_len]] for i in row]
    )
  return out


def test_packed_layout_matches_the_numpy_reference():
  examples = tagged(drawn_lengths("code_alpaca", 400, seed=2), seed=2)
  it = BatchIterator(examples, batch_size=BATCH, seq_len=SEQ, pad_id=7, seed=0, pack=True)
  checked = 0
  for _ in range(12):
    rows = it.state.rows[:BATCH]  # the next batch's rows, once a window is planned
    batch = {k: v.astype(np.float64) for k, v in next(it).items()}
    if len(rows) == BATCH:
      chex.assert_trees_all_equal(batch, reference_layout(examples, rows, SEQ, pad_id=7))
      checked += 1
  assert checked >= 8 and batch["segment_ids"].max() >= 3


def test_restore_rejects_rows_that_do_not_fit():
  examples = tagged([300, 300, 10])
  it = BatchIterator(examples, batch_size=1, seq_len=SEQ, pad_id=0, seed=0, pack=True)
  for bad in [((0, 1),), ((0, 3),)]:
    with pytest.raises(ValueError, match="does not fit 3 examples, pack=True"):
      it.restore(IteratorState(0, 3, bad))
  with pytest.raises(ValueError, match="pack=False"):
    BatchIterator(
        examples, batch_size=1, seq_len=SEQ, pad_id=0, seed=0, state=IteratorState(0, 3, ((2,),))
    )
  with pytest.raises(ValueError, match="pack_window >= 1"):
    BatchIterator(examples, batch_size=1, seq_len=SEQ, pad_id=0, seed=0, pack_window=0)


REAL_FILES = {
    "gsm8k": "gsm8k/train.jsonl",
    "code_alpaca": "code_alpaca/code_alpaca_2k.jsonl",
    "logiqa": "logiqa/validation.jsonl",
}


@pytest.fixture(scope="module")
def smollm2_encoder():
  from epi_jax.data.chat_template import ChatTemplateEncoder
  from epi_jax.models import load_tokenizer, resolve_checkpoint

  try:
    path = resolve_checkpoint("smollm2-135m-instruct")
  except FileNotFoundError as error:
    pytest.skip(str(error))
  return ChatTemplateEncoder(load_tokenizer(path))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real records live in ../shared/data")
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_records_fill_95_percent(name, smollm2_encoder, tmp_path):
  from epi_jax.data.adapters import load_chats

  chats = load_chats(name, SHARED_DATA / REAL_FILES[name], cache_dir=str(tmp_path))[:2000]
  assert epoch_fill(encode_chats(chats, smollm2_encoder), pack=True) >= 0.95
