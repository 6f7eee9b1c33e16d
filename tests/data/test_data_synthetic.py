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
    assert len(tok.encode_chat(chat)[0]) <= 48  # the cpu replication preset's seq_len


def test_task_answers_are_correct():
  def first(task):
    return synthetic.task_splits(task, seed=0, n_train=0, n_eval=1)[1][0]

  question, answer = (turn["content"] for turn in first("arithmetic"))
  a, b, c = (int(w.strip(",.")) for w in question.split() if w.strip(",.").isdigit())
  assert answer == f"{a}+{b}={a + b},{a + b}-{c}={a + b - c}"
  for chat in synthetic.task_splits("string_code", seed=0, n_train=0, n_eval=40)[1]:
    code, output = (turn["content"] for turn in chat)
    namespace = {}
    exec(code.replace("print(", "result = ("), namespace)  # noqa: S102 - the task's own code
    assert str(namespace["result"]) == output
  for chat in synthetic.task_splits("rewrite", seed=0, n_train=0, n_eval=40)[1]:
    instruction, words = chat[0]["content"].split(": ")
    lengths = [len(w) for w in words.split()]
    counts = {"Word count": len(lengths), "Short words": lengths.count(3)}
    assert chat[-1]["content"] == str(counts.get(instruction, lengths.count(4)))
  questions = set()
  for chat in synthetic.task_splits("dialogue", seed=0, n_train=0, n_eval=20)[1]:
    count = int(chat[0]["content"].split()[3])  # I'm NAME with COUNT ITEM.
    more = chat[2]["content"] == "One more?"
    assert chat[1]["content"] == f"Ok, {count}." and chat[-1]["content"] == str(count + more)
    questions.add(chat[2]["content"])
  assert questions == {"How many?", "One more?"}


def test_task_splits_reject_bad_arguments():
  with pytest.raises(ValueError, match="unknown task 'poetry'"):
    synthetic.task_splits("poetry", seed=0, n_train=1, n_eval=1)
  with pytest.raises(ValueError, match=">= 0"):
    synthetic.task_splits("rewrite", seed=0, n_train=-1, n_eval=1)


def test_logic_answers_follow_the_inference_rules():
  answers = []
  for chat in synthetic.task_splits("logic_choice", seed=1, n_train=0, n_eval=60)[1]:
    question, answer = (turn["content"] for turn in chat)
    conditional, fact, asked = question.split(". ")  # If x then y. [Not ]z. Is w?
    antecedent, consequent = conditional.removeprefix("If ").split(" then ")
    negated = fact.startswith("Not ")
    fact = fact.removeprefix("Not ")
    claim = asked.removeprefix("Is ").rstrip("?")
    if fact == antecedent and not negated and claim == consequent:
      assert answer == "yes"
    elif fact == consequent and negated and claim == antecedent:
      assert answer == "no"
    else:
      assert answer == "unknown" and {fact, claim} == {antecedent, consequent}
    answers.append(answer)
  assert set(answers) == {"yes", "no", "unknown"}


def test_stream_variants_answer_what_their_prompts_ask():
  """The cpu preset's stream tasks, against independent oracles: Python itself for the code,
  a truth table of the two conditionals for the chain, the stated count for the dialogue."""
  for chat in synthetic.task_splits("code_more", seed=2, n_train=0, n_eval=60)[1]:
    code, output = (turn["content"] for turn in chat)
    namespace = {}
    exec(code.replace("print(", "result = ("), namespace)  # noqa: S102 - the task's own code
    assert str(namespace["result"]) == output
  answers = set()
  for chat in synthetic.task_splits("logic_chain", seed=2, n_train=0, n_eval=90)[1]:
    question, answer = (turn["content"] for turn in chat)
    rules, fact, asked = question.split(". ")  # If x then y, y then z. [Not ]w. Is v?
    first, second = rules.removeprefix("If ").split(", ")
    implications = [tuple(part.split(" then ")) for part in (first, second)]
    atoms = sorted({a for pair in implications for a in pair})
    negated, fact = fact.startswith("Not "), fact.removeprefix("Not ")
    claim = asked.removeprefix("Is ").rstrip("?")
    worlds = [dict(zip(atoms, bits)) for bits in np.ndindex(*(2,) * len(atoms))]
    worlds = [
        w
        for w in worlds
        if all(not w[a] or w[b] for a, b in implications) and w[fact] == (not negated)
    ]
    truth = {bool(w[claim]) for w in worlds}
    assert answer == {frozenset({True}): "yes", frozenset({False}): "no"}.get(
        frozenset(truth), "unknown"
    )
    answers.add(answer)
  assert answers == {"yes", "no", "unknown"}
  questions = set()
  for chat in synthetic.task_splits("dialogue_more", seed=2, n_train=0, n_eval=30)[1]:
    count = int(chat[0]["content"].split()[3])
    change = {"Two more?": 2, "One less?": -1}[chat[2]["content"]]
    assert chat[-1]["content"] == str(count + change)
    questions.add(chat[2]["content"])
  assert questions == {"Two more?", "One less?"}
