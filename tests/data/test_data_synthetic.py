"""Embedded task suite and byte tokenizer."""

import numpy as np
import pytest

from epi_jax.data import byte_tokenizer, synthetic


def test_byte_tokenizer_round_trip():
  tok = byte_tokenizer.ByteTokenizer()
  for text in ["", "plain ascii", "héllo wörld ✓", "line\nbreak\ttab"]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size <= 264
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  ids, mask = tok.encode_chat(chat)
  assert ids.dtype == np.int32 and mask.dtype == bool
  assert tok.decode(ids, skip_special=False) == "<bos><|user|>hi<eos><|assistant|>yo<eos>"
  assert tok.decode(ids[mask]) == "yo" and ids[mask][-1] == tok.eos_id
  prompt = tok.encode_prompt(chat[:1])
  np.testing.assert_array_equal(prompt, ids[: len(prompt)])


def test_byte_tokenizer_rejects_bad_input():
  tok = byte_tokenizer.ByteTokenizer()
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([300])
  with pytest.raises(ValueError, match="role"):
    tok.encode_chat([{"role": "bot", "content": "x"}])
  with pytest.raises(ValueError, match="non-empty"):
    tok.encode_chat([])


@pytest.mark.parametrize("task", synthetic.TASK_NAMES)
def test_task_splits_are_seeded_disjoint_and_short(task):
  train, evaluation = synthetic.task_splits(task, seed=3, n_train=300, n_eval=50)
  again, evaluation_again = synthetic.task_splits(task, seed=3, n_train=300, n_eval=50)
  assert train == again and evaluation == evaluation_again
  other, _ = synthetic.task_splits(task, seed=4, n_train=300, n_eval=50)
  assert other != train
  _, smaller_train_eval = synthetic.task_splits(task, seed=3, n_train=10, n_eval=50)
  assert smaller_train_eval == evaluation

  def prompt(chat):
    return tuple(turn["content"] for turn in chat[:-1])

  assert len({prompt(c) for c in train}) == 300
  assert not {prompt(c) for c in train} & {prompt(c) for c in evaluation}
  tok = byte_tokenizer.ByteTokenizer()
  for chat in train:
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"]
    assert len(tok.encode_chat(chat)[0]) <= 120


def test_task_answers_are_correct():
  def first(task):
    return synthetic.task_splits(task, seed=0, n_train=0, n_eval=1)[1][0]

  question, answer = (turn["content"] for turn in first("arithmetic"))
  a, b, c = (int(w.strip(",.")) for w in question.split() if w.strip(",.").isdigit())
  assert answer.endswith(f"={a + b - c}")
  for chat in synthetic.task_splits("string_code", seed=0, n_train=0, n_eval=40)[1]:
    code, output = (turn["content"] for turn in chat)
    namespace = {}
    exec(code.replace("print(", "result = ("), namespace)  # noqa: S102 - the task's own code
    assert str(namespace["result"]) == output
  for chat in synthetic.task_splits("dialogue", seed=0, n_train=0, n_eval=20)[1]:
    words = chat[0]["content"].rstrip(".").split()  # I am NAME. I have COUNT ITEM
    name, count, item = words[2].rstrip("."), words[5], words[6]
    expected = f"You have {count}." if item in chat[2]["content"] else f"You are {name}."
    assert chat[-1]["content"] == expected


def test_task_splits_reject_bad_arguments():
  with pytest.raises(ValueError, match="unknown task 'poetry'"):
    synthetic.task_splits("poetry", seed=0, n_train=1, n_eval=1)
  with pytest.raises(ValueError, match=">= 0"):
    synthetic.task_splits("rewrite", seed=0, n_train=-1, n_eval=1)


def test_logic_answers_follow_the_inference_rules():
  answers = []
  for chat in synthetic.task_splits("logic_choice", seed=1, n_train=0, n_eval=60)[1]:
    question, letter = (turn["content"] for turn in chat)
    conditional, fact, asked = question.split(" A)")[0].split(". ")
    antecedent, consequent = conditional.removeprefix("If ").split(", ")
    negated = " not " in fact
    fact = fact.replace(" not ", " ").rstrip(".")
    name, mood = asked.removeprefix("Is ").rstrip("?").split()
    claim = f"{name} is {mood}"
    if fact == antecedent and not negated and claim == consequent:
      assert letter == "A"
    elif fact == consequent and negated and claim == antecedent:
      assert letter == "B"
    else:
      assert letter == "C" and {fact, claim} == {antecedent, consequent}
    answers.append(letter)
  assert set(answers) == {"A", "B", "C"}
