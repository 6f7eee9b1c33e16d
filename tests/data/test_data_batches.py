"""Padding, packing, the resumable iterator and task streams."""

import dataclasses

import numpy as np
import pytest

from epi_jax.data.batching import Encoded, encode_chats, make_batch
from epi_jax.data.byte_tokenizer import ByteTokenizer
from epi_jax.data.iterator import BatchIterator, IteratorState
from epi_jax.data.adapters import DATASET_NAMES, DATASET_SKILLS
from epi_jax.data.streams import (
    SKILLS,
    mixture_iterator,
    random_grouping,
    skill_grouping,
    stage_iterators,
)
from epi_jax.data.synthetic import BASE_TASKS, TASK_NAMES, TASK_SKILLS, task_splits

TOKENIZER = ByteTokenizer()


def example(n_prompt, n_response, start=1):
  ids = np.arange(start, start + n_prompt + n_response, dtype=np.int32)
  return Encoded(ids, np.arange(n_prompt + n_response) >= n_prompt)


def test_padding_layout():
  batch = make_batch([[example(2, 3)], [example(1, 1)]], seq_len=8, pad_id=0)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "input_ids": ((2, 8), np.int32),
      "loss_mask": ((2, 8), np.float32),
      "attention_mask": ((2, 8), np.int32),
      "segment_ids": ((2, 8), np.int32),
      "positions": ((2, 8), np.int32),
  }
  np.testing.assert_array_equal(batch["input_ids"][0], [1, 2, 3, 4, 5, 0, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["attention_mask"][1], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 0, 0, 0])
  with pytest.raises(ValueError, match="row 0 holds 9 tokens"):
    make_batch([[example(4, 5)]], seq_len=8, pad_id=0)


def test_packing_layout_masks_each_segment_start():
  # The second example's first token is a response token: it must not be learned from the first.
  batch = make_batch([[example(2, 2), example(0, 3, start=10)]], seq_len=9, pad_id=0)
  np.testing.assert_array_equal(batch["input_ids"][0], [1, 2, 3, 4, 10, 11, 12, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 2, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 1, 1, 0, 0])


def test_loss_mask_covers_exactly_the_response_tokens():
  chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  batch = make_batch([encode_chats([chat], TOKENIZER)], seq_len=16, pad_id=TOKENIZER.pad_id)
  response = batch["input_ids"][0][batch["loss_mask"][0] == 1]
  assert TOKENIZER.decode(response) == "4" and response[-1] == TOKENIZER.eos_id


def synthetic_examples(n=40):
  chats, _ = task_splits("rewrite", seed=0, n_train=n, n_eval=0)
  return encode_chats(chats, TOKENIZER)


@pytest.mark.parametrize("pack", [False, True])
def test_iterator_is_deterministic_and_resumes_exactly(pack):
  examples = synthetic_examples()
  settings = dict(batch_size=4, seq_len=96, pad_id=TOKENIZER.pad_id, seed=7, pack=pack)
  first = BatchIterator(examples, **settings)
  for _ in range(5):
    next(first)
  saved = dataclasses.asdict(first.state)
  expected = [next(first) for _ in range(20)]  # crosses several epochs
  resumed = BatchIterator(examples, **settings, state=IteratorState(**saved))
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  other_seed = BatchIterator(examples, **{**settings, "seed": 8})
  fresh = BatchIterator(examples, **settings)
  assert not np.array_equal(next(other_seed)["input_ids"], next(fresh)["input_ids"])


def test_iterator_epochs_visit_every_example_once():
  examples = [example(1, 1, start=i) for i in range(1, 11)]
  it = BatchIterator(examples, batch_size=5, seq_len=4, pad_id=0, seed=0)
  epoch = np.concatenate([next(it)["input_ids"][:, 0] for _ in range(2)])
  assert sorted(epoch) == list(range(1, 11)) and it.state in (
      IteratorState(0, 10),
      IteratorState(1, 0),
  )
  next_epoch = np.concatenate([next(it)["input_ids"][:, 0] for _ in range(2)])
  assert sorted(next_epoch) == list(range(1, 11)) and list(next_epoch) != list(epoch)


def test_packing_fills_rows_and_truncates_long_examples():
  examples = synthetic_examples()
  packed = next(
      BatchIterator(examples, batch_size=2, seq_len=256, pad_id=TOKENIZER.pad_id, seed=0, pack=True)
  )
  assert (packed["segment_ids"].max(axis=1) >= 3).all()
  long = BatchIterator([example(3, 20)], batch_size=1, seq_len=8, pad_id=0, seed=0)
  assert next(long)["attention_mask"].sum() == 8


def test_iterator_rejects_bad_arguments():
  with pytest.raises(ValueError, match="at least one example"):
    BatchIterator([], batch_size=1, seq_len=8, pad_id=0, seed=0)
  with pytest.raises(ValueError, match="batch_size >= 1"):
    BatchIterator([example(1, 1)], batch_size=0, seq_len=8, pad_id=0, seed=0)
  with pytest.raises(ValueError, match="does not fit 1 examples"):
    BatchIterator(
        [example(1, 1)], batch_size=1, seq_len=8, pad_id=0, seed=0, state=IteratorState(0, 5)
    )


def test_stages_and_mixture():
  examples = {
      task: encode_chats(task_splits(task, seed=0, n_train=8, n_eval=0)[0], TOKENIZER)
      for task in TASK_NAMES
  }
  settings = dict(batch_size=8, seq_len=128, pad_id=TOKENIZER.pad_id, seed=1)
  stages = [["arithmetic"], ["dialogue", "rewrite"]]
  first, second = stage_iterators(examples, stages, **settings)
  arithmetic = {TOKENIZER.decode(e.input_ids) for e in examples["arithmetic"]}
  assert {
      TOKENIZER.decode(row[row != TOKENIZER.pad_id]) for row in next(first)["input_ids"]
  } == arithmetic
  again = stage_iterators(examples, stages, **settings)[1]
  np.testing.assert_array_equal(next(second)["input_ids"], next(again)["input_ids"])
  mixed = mixture_iterator(examples, **settings)
  rows = [
      TOKENIZER.decode(r[r != TOKENIZER.pad_id]) for _ in range(5) for r in next(mixed)["input_ids"]
  ]
  assert len(set(rows)) == 40
  for bad, message in [
      ([["arithmetic"], ["arithmetic"]], "more than one stage"),
      ([["poetry"]], "unknown task 'poetry'"),
      ([[]], "stage 0 must be"),
  ]:
    with pytest.raises(ValueError, match=message):
      stage_iterators(examples, bad, **settings)


def test_random_grouping_is_a_seeded_partition():
  grouping = random_grouping(BASE_TASKS, 3, seed=0)
  assert grouping == random_grouping(BASE_TASKS, 3, seed=0)
  assert sorted(t for stage in grouping for t in stage) == sorted(BASE_TASKS)
  assert sorted(len(stage) for stage in grouping) == [1, 2, 2]
  with pytest.raises(ValueError, match="num_stages"):
    random_grouping(BASE_TASKS, 6, seed=0)


def test_every_task_and_dataset_names_a_skill():
  assert set(TASK_SKILLS) == set(TASK_NAMES) and set(TASK_SKILLS.values()) <= set(SKILLS)
  assert set(DATASET_SKILLS) == set(DATASET_NAMES) and set(DATASET_SKILLS.values()) <= set(SKILLS)


def test_skill_grouping_orders_stages_by_skill():
  skills = {"a": "open_ended", "b": "reasoning", "c": "open_ended", "d": "reasoning"}
  assert skill_grouping(["a", "b", "c", "d", "x"], skills) == [["b", "d"], ["a", "c"], ["x"]]
  assert skill_grouping(list(BASE_TASKS), TASK_SKILLS) == [
      ["arithmetic", "logic_choice"],
      ["string_code"],
      ["rewrite", "dialogue"],
  ]
  assert skill_grouping(list(DATASET_NAMES), DATASET_SKILLS) == [
      ["gsm8k", "logiqa"],
      ["code_alpaca"],
      ["alpaca", "ultrachat"],
  ]
