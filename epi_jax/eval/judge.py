r"""A 1-10 LLM judge over any OpenAI-compatible chat-completions endpoint (MT-Bench single answer).

References:
  Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", NeurIPS 2023,
  arXiv:2306.05685. FastChat ``fastchat/llm_judge/data/judge_prompts.jsonl`` entry "single-v1"
  (system prompt and prompt template below, verbatim) and ``fastchat/llm_judge/common.py``
  ``run_judge_single``: temperature 0, max_tokens 2048, the rating read with ``\[\[(\d+\.?\d*)\]\]``,
  falling back to ``\[(\d+\.?\d*)\]``. Unlike FastChat, a rating outside 1-10 counts as unrated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from epi_jax.data import Turn

SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level "
    "of detail of the response. Begin your evaluation by providing a short explanation. Be as "
    "objective as possible. After providing your explanation, you must rate the response on a "
    'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".\n\n[Question]\n{question}\n\n[The Start of Assistant\'s Answer]\n{answer}\n'
    "[The End of Assistant's Answer]"
)
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgment: str) -> float | None:
  """The rating in ``[[r]]`` (else the first ``[r]``) of a judgment; None if absent or not in 1-10."""
  match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
  if match is None:
    return None
  rating = float(match.group(1))
  return rating if 1 <= rating <= 10 else None


def judge_question(prompt: Sequence[Turn]) -> str:
  """The ``{question}`` of the judge prompt: the user turn, or for a dialogue the earlier turns
  as FastChat's multi-turn template writes them (``### User:`` / ``### Assistant:``) and then the
  last user turn. System turns are left out."""
  turns = [turn for turn in prompt if turn["role"] != "system"]
  if len(turns) == 1:
    return turns[0]["content"]
  names = {"user": "User", "assistant": "Assistant"}
  return "\n\n".join(f"### {names[t['role']]}:\n{t['content']}" for t in turns)


@dataclasses.dataclass(frozen=True)
class Judgment:
  """The judge's verdict on one answer."""

  rating: float | None
  """1-10, or None when the reply held no rating or no reply came."""
  status: str
  """rated | unrated (a reply without a rating) | failed (no reply after every retry)."""


class Judge:
  """Rates answers 1-10 with a chat-completions model, caching every reply on disk.

  Args:
    url: the endpoint, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended
      unless the URL already ends with it).
    model: the judge model's name, sent as ``model``.
    api_key_env: name of the environment variable holding the API key (sent as a bearer
      token, never stored or printed); empty: no key.
    timeout: seconds to wait for one reply.
    retries: further attempts after a failed one (timeout, connection error, HTTP 429/5xx, a
      body that is not a chat completion), waiting ``backoff`` * 2**attempt seconds before each.
    backoff: the first wait, in seconds.
    cache_path: a JSON Lines file of earlier replies keyed by the SHA-256 of (url, model,
      system prompt, judge prompt); a reply found there is never asked for again.
    workers: requests in flight at once.
  """

  def __init__(
      self,
      *,
      url: str,
      model: str,
      api_key_env: str = "",
      timeout: float = 60.0,
      retries: int = 3,
      backoff: float = 1.0,
      cache_path: str | None = None,
      workers: int = 4,
  ):
    if not url or not model:
      raise ValueError("the judge needs both eval.judge.url and eval.judge.model")
    if api_key_env and not os.environ.get(api_key_env):
      raise ValueError(
          f"eval.judge.api_key_env names the environment variable {api_key_env!r}, "
          "which is not set"
      )
    if timeout <= 0 or retries < 0 or backoff < 0 or workers < 1:
      raise ValueError(
          f"need timeout > 0, retries >= 0, backoff >= 0, workers >= 1; got "
          f"{timeout}, {retries}, {backoff}, {workers}"
      )
    base = url.rstrip("/")
    self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
    self.model = model
    self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, workers
    self._api_key_env = api_key_env
    self.cache_path = cache_path
    self._cache: dict[str, str] = {}
    self._lock = threading.Lock()
    if cache_path and os.path.exists(cache_path):
      with open(cache_path) as f:
        for line in f:
          if line.strip():
            entry = json.loads(line)
            self._cache[entry["key"]] = entry["judgment"]
    self.requests = 0
    """HTTP requests sent so far (retries included)."""

  def _key(self, prompt: str) -> str:
    return hashlib.sha256(
        json.dumps([self.url, self.model, SYSTEM_PROMPT, prompt]).encode()
    ).hexdigest()

  def _post(self, prompt: str) -> str:
    body = {
        "model": self.model,
        "temperature": 0,
        "max_tokens": 2048,
        "n": 1,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ],
    }
    headers = {"Content-Type": "application/json"}
    if self._api_key_env:
      headers["Authorization"] = f"Bearer {os.environ.get(self._api_key_env, '')}"
    request = urllib.request.Request(
        self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with self._lock:
      self.requests += 1
    with urllib.request.urlopen(request, timeout=self.timeout) as response:
      reply = json.loads(response.read())
    content = reply["choices"][0]["message"]["content"]
    if not isinstance(content, str):
      raise ValueError("the reply's message content is not a string")
    return content

  def _ask(self, prompt: str) -> str | None:
    """The judge's reply to ``prompt`` (from the cache if there), or None after every retry failed."""
    key = self._key(prompt)
    with self._lock:
      if key in self._cache:
        return self._cache[key]
    problem = ""
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1))
      try:
        judgment = self._post(prompt)
      except urllib.error.HTTPError as error:
        problem = f"HTTP {error.code}"
        if error.code != 429 and error.code < 500:
          break  # a request the server refuses will not succeed on a retry
        continue
      except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        problem = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        continue
      except (ValueError, KeyError, IndexError, TypeError) as error:
        problem = f"not a chat completion ({type(error).__name__})"
        continue
      with self._lock:
        self._cache[key] = judgment
        if self.cache_path:
          with open(self.cache_path, "a") as f:
            f.write(json.dumps({"key": key, "judgment": judgment}) + "\n")
      return judgment
    print(
        f"judge: no reply from {self.url} after {attempt + 1} attempt(s): {problem}",
        file=sys.stderr,
    )
    return None

  def judge(self, question: str, answer: str) -> Judgment:
    """The rating of ``answer`` to ``question``."""
    judgment = self._ask(PROMPT_TEMPLATE.format(question=question, answer=answer))
    if judgment is None:
      return Judgment(None, "failed")
    rating = parse_rating(judgment)
    return Judgment(rating, "rated" if rating is not None else "unrated")

  def scores(
      self, questions: Sequence[str], answers: Sequence[str]
  ) -> dict[str, float | int | None]:
    """Mean rating of the rated answers (``judge_score``, None if none was rated) and the
    counts ``judge_rated``, ``judge_unrated``, ``judge_failed``."""
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      verdicts = list(pool.map(self.judge, questions, answers))
    rated = [v.rating for v in verdicts if v.rating is not None]
    return {
        "judge_score": sum(rated) / len(rated) if rated else None,
        **{
            f"judge_{status}": sum(v.status == status for v in verdicts)
            for status in ("rated", "unrated", "failed")
        },
    }
