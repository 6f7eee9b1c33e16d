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
_ITEMS = ("pens", "eggs", "cards", "shells", "coins", "books", "plums", "rocks")
_WORDS = ("red", "fig", "sun", "map", "owl", "jam", "kite", "pear", "moon", "lamp", "rain",
          "cat", "box", "tree", "wolf", "gold", "salt", "ink", "bell", "dust")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def arithmetic(rng: np.random.Generator) -> list[Turn]:
    """Two-step word problem with its worked answer (stands in for GSM8K)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = (int(x) for x in rng.integers(1, 6, size=2))
    c = int(rng.integers(1, a + b))
    prompt = f"{name} has {a} {item}, gets {b}, gives {c}. How many?"
    return _user_assistant(prompt, f"{a}+{b}={a + b}, {a + b}-{c}={a + b - c}")


_STRING_OPS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("s[::-1]", lambda s: s[::-1]),
    ("s.upper()", str.upper),
    ("s[1:]+s[0]", lambda s: s[1:] + s[0]),
    ("s*2", lambda s: s * 2),
)


def string_code(rng: np.random.Generator) -> list[Turn]:
    """Output of a Python string expression on a random word (stands in for CodeAlpaca)."""
    word = "".join(rng.choice(list(_LETTERS[:10]), size=3))
    code, fn = _STRING_OPS[int(rng.integers(len(_STRING_OPS)))]
    return _user_assistant(f"s = '{word}'\nprint({code})", fn(word))


_MOODS = ("sad", "hot", "late", "ill", "busy", "calm", "shy", "tired")
# (fact, question) -> answer for the conditional "If P, Q.": P stated, Q asked, and so on.
_INFERENCES = ((("P", "Q"), "A"),    # modus ponens: yes
               (("~Q", "P"), "B"),   # modus tollens: no
               (("Q", "P"), "C"),    # affirming the consequent: unknown
               (("~P", "Q"), "C"))   # denying the antecedent: unknown


def logic_choice(rng: np.random.Generator) -> list[Turn]:
    """Is a claim entailed by a conditional and a fact: yes, no or unknown (stands in for LogiQA)."""
    (x, y), (p, q) = rng.choice(_NAMES, size=2, replace=False), rng.choice(_MOODS, size=2)
    atoms = {"P": (x, p), "Q": (y, q)}
    # Yes, no and unknown equally often: the two unknown forms share one third.
    (fact, asked), answer = _INFERENCES[[0, 1, 2 + int(rng.integers(2))][int(rng.integers(3))]]
    person, mood = atoms[fact[-1]]
    stated = f"{person} is {'not ' if fact.startswith('~') else ''}{mood}."
    claim = "Is {} {}?".format(*atoms[asked])
    return _user_assistant(f"If {x} is {p}, {y} is {q}. {stated} {claim} A)yes B)no C)unknown", answer)


_REWRITES: tuple[tuple[str, Callable[[list[str]], str]], ...] = (
    ("Capitalize each word", lambda w: " ".join(x.capitalize() for x in w)),
    ("Join with dashes", "-".join),
    ("Give the last word", lambda w: w[-1]),
    ("Count the words", lambda w: str(len(w))),
)


def rewrite(rng: np.random.Generator) -> list[Turn]:
    """A natural-language instruction applied to a list of words (stands in for Alpaca)."""
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 4)), replace=False)]
    instruction, fn = _REWRITES[int(rng.integers(len(_REWRITES)))]
    return _user_assistant(f"{instruction}: {' '.join(words)}", fn(words))


_FACTS = (("city", ("Oslo", "Lima", "Rome", "Kyiv", "Pune", "Bern", "Doha", "Riga")),
          ("pet", ("dog", "cat", "fox", "owl", "eel", "yak", "emu", "hen")),
          ("color", ("navy", "blue", "teal", "pink", "gray", "gold", "lime", "plum")))


def dialogue(rng: np.random.Generator) -> list[Turn]:
    """Three-turn exchange; the last answer recalls a fact from the first (stands in for UltraChat)."""
    name = str(rng.choice(_NAMES))
    values = {key: str(rng.choice(options)) for key, options in _FACTS}
    facts = ", ".join(f"{key}: {value}" for key, value in values.items())
    key = _FACTS[int(rng.integers(len(_FACTS)))][0]
    return [
        {"role": "user", "content": f"{facts}. I am {name}."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": f"What is my {key}?"},
        {"role": "assistant", "content": f"Your {key} is {values[key]}."},
    ]


TASKS: dict[str, Callable[[np.random.Generator], list[Turn]]] = {
    "arithmetic": arithmetic,
    "string_code": string_code,
    "logic_choice": logic_choice,
    "rewrite": rewrite,
    "dialogue": dialogue,
}
TASK_NAMES = tuple(TASKS)
TASK_METRICS = dict.fromkeys(TASKS, "exact_match")
"""How each task's held-out examples are scored: a key of `epi_jax.eval.METRICS`."""


def task_splits(task: str, *, seed: int, n_train: int, n_eval: int
                ) -> tuple[list[list[Turn]], list[list[Turn]]]:
    """Train and eval chats of `task` whose prompts (all turns but the last) are disjoint.

    The eval set depends only on (task, seed, n_eval), not on `n_train`.

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


TASK_SKILLS = {"arithmetic": "reasoning", "string_code": "code", "logic_choice": "reasoning",
               "rewrite": "open_ended", "dialogue": "open_ended"}
"""The skill each task exercises, for the heuristic grouping: one of ``epi_jax.data.SKILLS``."""
