"""The embedded default task suite: five seeded, procedurally generated chat tasks.

Each stands in for one of the paper's datasets (Section 3.1) and is scored by exact match of
the final assistant turn. Nothing is downloaded; the same seed gives the same examples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from epi_jax.data.turns import Turn
from epi_jax.data.turns import user_assistant as _user_assistant

_NAMES = ("Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jo", "Kai", "Liv", "Max")
_ITEMS = ("pens", "eggs", "figs", "cups", "hats", "keys", "nuts", "jars")
_WORDS = (
    "red",
    "fig",
    "sun",
    "map",
    "owl",
    "jam",
    "kite",
    "pear",
    "moon",
    "lamp",
    "rain",
    "cat",
    "box",
    "tree",
    "wolf",
    "gold",
    "salt",
    "ink",
    "bell",
    "dust",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def arithmetic(rng: np.random.Generator) -> list[Turn]:
  """Two-step word problem with its worked answer (stands in for GSM8K)."""
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  a, b = (int(x) for x in rng.integers(1, 5, size=2))
  c = int(rng.integers(1, a + b))
  prompt = f"{name} has {a} {item}, gets {b}, gives {c}."
  return _user_assistant(prompt, f"{a}+{b}={a + b},{a + b}-{c}={a + b - c}")


# Expressions whose value is a count or a truth value: a small model learns to read these off
# the word within one stage of the sequence (copying characters out of it it does not).
_STRING_EXPRS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("len(s)", lambda s: str(len(s))),
    ("s.count('a')", lambda s: str(s.count("a"))),
    ("s.count('b')", lambda s: str(s.count("b"))),
    ("'a' in s", lambda s: str("a" in s)),
    ("'c' in s", lambda s: str("c" in s)),
    ("len(s) > 3", lambda s: str(len(s) > 3)),
)


def string_code(rng: np.random.Generator) -> list[Turn]:
  """What a Python expression on a random word prints (stands in for CodeAlpaca)."""
  word = "".join(rng.choice(list(_LETTERS[:5]), size=int(rng.integers(2, 6))))
  code, fn = _STRING_EXPRS[int(rng.integers(len(_STRING_EXPRS)))]
  return _user_assistant(f"s = '{word}'\nprint({code})", fn(word))


# (fact, question) -> answer for the conditional "If x then y.": x stated, y asked, and so on.
_INFERENCES = (
    (("x", "y"), "yes"),  # modus ponens
    (("~y", "x"), "no"),  # modus tollens
    (("y", "x"), "unknown"),  # affirming the consequent
    (("~x", "y"), "unknown"),  # denying the antecedent
)


def logic_choice(rng: np.random.Generator) -> list[Turn]:
  """Is a claim entailed by a conditional and a fact: yes, no or unknown (stands in for LogiQA)."""
  x, y = (str(v) for v in rng.choice(list(_LETTERS), size=2, replace=False))
  atoms = {"x": x, "y": y}
  # Yes, no and unknown equally often: the two unknown forms share one third.
  (fact, asked), answer = _INFERENCES[[0, 1, 2 + int(rng.integers(2))][int(rng.integers(3))]]
  stated = f"Not {atoms[fact[-1]]}." if fact.startswith("~") else f"{atoms[fact]}."
  return _user_assistant(f"If {x} then {y}. {stated} Is {atoms[asked]}?", answer)


# Instructions whose answer is a count over the words: a small model learns these in one stage
# (copying a word out of the list it does not learn in 200 steps).
_REWRITES: tuple[tuple[str, Callable[[list[str]], str]], ...] = (
    ("Word count", lambda w: str(len(w))),
    ("Short words", lambda w: str(sum(len(x) == 3 for x in w))),
    ("Long words", lambda w: str(sum(len(x) == 4 for x in w))),
)


def rewrite(rng: np.random.Generator) -> list[Turn]:
  """A natural-language instruction applied to a list of words (stands in for Alpaca)."""
  words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 6)), replace=False)]
  instruction, fn = _REWRITES[int(rng.integers(len(_REWRITES)))]
  return _user_assistant(f"{instruction}: {' '.join(words)}", fn(words))


# Follow-up questions about the count stated in the first turn: the answer is that count,
# changed by what the question says. The first reply repeats the count: without it the small
# model learns the recall in one stage at some seeds only (recalling the name it does not learn).
_FOLLOW_UPS: tuple[tuple[str, int], ...] = (("How many?", 0), ("One more?", 1))


def dialogue(rng: np.random.Generator) -> list[Turn]:
  """Three-turn exchange; the last answer tracks the count stated in the first turn (stands in
  for UltraChat)."""
  return _count_dialogue(rng, _FOLLOW_UPS)


def _count_dialogue(rng: np.random.Generator, follow_ups: tuple[tuple[str, int], ...]):
  name, item = str(rng.choice(_NAMES)), str(rng.choice(_ITEMS))
  count = int(rng.integers(1, 10))
  question, change = follow_ups[int(rng.integers(len(follow_ups)))]
  return [
      {"role": "user", "content": f"I'm {name} with {count} {item}."},
      {"role": "assistant", "content": f"Ok, {count}."},
      {"role": "user", "content": question},
      {"role": "assistant", "content": str(count + change)},
  ]


# The stream tasks of the ``cpu`` preset: harder variants of three embedded tasks, fine-tuned
# on a base that learned the five (the variants share a format with their originals, so
# learning one can cost the other).
_MORE_STRING_EXPRS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("s.count('c')", lambda s: str(s.count("c"))),
    ("s.count('d')", lambda s: str(s.count("d"))),
    ("'b' in s", lambda s: str("b" in s)),
    ("'e' in s", lambda s: str("e" in s)),
    ("len(s) < 4", lambda s: str(len(s) < 4)),
    ("s[0] == 'a'", lambda s: str(s[0] == "a")),
)


def code_more(rng: np.random.Generator) -> list[Turn]:
  """``string_code`` with other expressions on the same kind of word."""
  word = "".join(rng.choice(list(_LETTERS[:5]), size=int(rng.integers(2, 6))))
  code, fn = _MORE_STRING_EXPRS[int(rng.integers(len(_MORE_STRING_EXPRS)))]
  return _user_assistant(f"s = '{word}'\nprint({code})", fn(word))


# (fact, question) -> answer for the chain "If x then y, y then z.": two inferences in a row.
_CHAINS = (
    (("x", "z"), "yes"),
    (("y", "z"), "yes"),
    (("~z", "x"), "no"),
    (("~y", "x"), "no"),
    (("z", "x"), "unknown"),
    (("~x", "z"), "unknown"),
)


def logic_chain(rng: np.random.Generator) -> list[Turn]:
  """``logic_choice`` over a chain of two conditionals: yes, no or unknown, equally often."""
  x, y, z = (str(v) for v in rng.choice(list(_LETTERS), size=3, replace=False))
  atoms = {"x": x, "y": y, "z": z}
  (fact, asked), answer = _CHAINS[int(rng.integers(len(_CHAINS)))]
  stated = f"Not {atoms[fact[-1]]}." if fact.startswith("~") else f"{atoms[fact]}."
  return _user_assistant(f"If {x} then {y}, {y} then {z}. {stated} Is {atoms[asked]}?", answer)


_MORE_FOLLOW_UPS: tuple[tuple[str, int], ...] = (("Two more?", 2), ("One less?", -1))


def dialogue_more(rng: np.random.Generator) -> list[Turn]:
  """``dialogue`` with other follow-ups: the count plus two, or minus one."""
  return _count_dialogue(rng, _MORE_FOLLOW_UPS)


TASKS: dict[str, Callable[[np.random.Generator], list[Turn]]] = {
    "arithmetic": arithmetic,
    "string_code": string_code,
    "logic_choice": logic_choice,
    "rewrite": rewrite,
    "dialogue": dialogue,
    "code_more": code_more,
    "logic_chain": logic_chain,
    "dialogue_more": dialogue_more,
}
TASK_NAMES = tuple(TASKS)
BASE_TASKS = TASK_NAMES[:5]
"""The five that stand in for the paper's datasets (the default ``data.tasks``)."""
VARIANT_TASKS = TASK_NAMES[5:]
"""Harder variants of three of them: the ``cpu`` preset's stream on a base that learned the five."""
TASK_METRICS = dict.fromkeys(TASKS, "exact_match")
"""How each task's held-out examples are scored: a key of ``epi_jax.eval.METRICS``."""


def task_splits(
    task: str, *, seed: int, n_train: int, n_eval: int
) -> tuple[list[list[Turn]], list[list[Turn]]]:
  """Train and eval chats of ``task`` whose prompts (all turns but the last) are disjoint.

  The eval set depends only on (task, seed, n_eval), not on ``n_train``.

  >>> train, evaluation = task_splits("arithmetic", seed=0, n_train=8, n_eval=4)
  >>> len(train), len(evaluation), evaluation[0][-1]["role"]
  (8, 4, 'assistant')
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
  if n_train < 0 or n_eval < 0:
    raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
  rng = np.random.default_rng([seed, TASK_NAMES.index(task)])
  chats, seen = [], set()
  for _ in range(20 * (n_train + n_eval) + 100):
    if len(chats) == n_train + n_eval:
      break
    chat = TASKS[task](rng)
    prompt = tuple(turn["content"] for turn in chat[:-1])
    if prompt not in seen:
      seen.add(prompt)
      chats.append(chat)
  else:
    raise ValueError(f"task {task!r} has too few distinct prompts for {n_train + n_eval} examples")
  return chats[n_eval:], chats[:n_eval]


TASK_SKILLS = {
    "arithmetic": "reasoning",
    "string_code": "code",
    "logic_choice": "reasoning",
    "rewrite": "open_ended",
    "dialogue": "open_ended",
    "code_more": "code",
    "logic_chain": "reasoning",
    "dialogue_more": "open_ended",
}
"""The skill each task exercises, for the heuristic grouping: one of ``epi_jax.data.SKILLS``."""
