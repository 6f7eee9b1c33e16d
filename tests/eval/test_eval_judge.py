"""The LLM judge against a local chat-completions server: ratings, failures, retries, cache, key."""

import json

import pytest

from epi_jax.eval.judge import PROMPT_TEMPLATE, SYSTEM_PROMPT, Judge, judge_question, parse_rating
from eval_judge_server import JudgeServer, completion

KEY = "sk-test-0123456789abcdef"


@pytest.mark.parametrize(
    "judgment, rating",
    [
        ("The answer is correct and clear. Rating: [[8]]", 8.0),
        ("Good. [[7.5]] overall", 7.5),
        ("Decent answer. Rating: [6]", 6.0),  # FastChat's fallback pattern
        ("First [[3]] then [[9]]", 3.0),  # the first match counts
        ("Rating: [[10]]", 10.0),
        ("Rating: 7/10", None),  # no bracketed rating
        ("Rating: [[seven]]", None),
        ("Rating: [[0]]", None),  # outside 1-10
        ("Rating: [[11]]", None),
        ("", None),
    ],
)
def test_parse_rating(judgment, rating):
  assert parse_rating(judgment) == rating


def test_question_of_a_dialogue_keeps_the_earlier_turns():
  assert (
      judge_question([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == "q"
  )
  dialogue = [
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Bye?"},
  ]
  assert judge_question(dialogue) == "### User:\nHi\n\n### Assistant:\nHello\n\n### User:\nBye?"


def test_ratings_malformed_replies_and_the_request_format(tmp_path, monkeypatch):
  monkeypatch.setenv("EPI_TEST_JUDGE_KEY", KEY)
  replies = {
      "a1": "Helpful. Rating: [[9]]",
      "a2": "Rating: [4]",
      "a3": "I cannot rate this.",
      "a4": "Rating: [[12]]",
  }

  def answer(body):
    text = body["messages"][1]["content"]
    name = next(a for a in replies if f"\n{a}\n" in text)
    return (200, completion(replies[name]), 0.0)

  with JudgeServer(default=answer) as server:
    judge = Judge(
        url=server.url,
        model="judge-model",
        api_key_env="EPI_TEST_JUDGE_KEY",
        timeout=5,
        retries=0,
        cache_path=str(tmp_path / "cache.jsonl"),
    )
    scores = judge.scores(["q1", "q2", "q3", "q4"], ["a1", "a2", "a3", "a4"])
  assert scores == {"judge_score": 6.5, "judge_rated": 2, "judge_unrated": 2, "judge_failed": 0}
  request = server.requests[0]
  assert request["path"] == "/v1/chat/completions"
  assert request["headers"]["Authorization"] == f"Bearer {KEY}"
  body = request["body"]
  assert body["model"] == "judge-model" and body["temperature"] == 0
  assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
  asked = sorted(r["body"]["messages"][1]["content"] for r in server.requests)
  assert asked == sorted(
      PROMPT_TEMPLATE.format(question=f"q{i}", answer=f"a{i}") for i in range(1, 5)
  )
  assert KEY not in (tmp_path / "cache.jsonl").read_text()


def test_a_500_then_success_and_a_body_that_is_no_completion(tmp_path, monkeypatch):
  with JudgeServer(
      [
          (500, b"{}", 0.0),
          (200, completion("Rating: [[6]]"), 0.0),
          (502, b"", 0.0),
          (200, b"<html>", 0.0),
      ]
  ) as server:
    judge = Judge(url=server.url + "/chat/completions", model="m", retries=1, backoff=0.01)
    assert judge.scores(["q"], ["a"]) == {
        "judge_score": 6.0,
        "judge_rated": 1,
        "judge_unrated": 0,
        "judge_failed": 0,
    }
    assert judge.scores(["q"], ["b"]) == {
        "judge_score": None,
        "judge_rated": 0,
        "judge_unrated": 0,
        "judge_failed": 1,
    }
  assert len(server.requests) == 4 and judge.requests == 4
  assert "Authorization" not in server.requests[0]["headers"]


def test_a_client_error_is_not_retried():
  with JudgeServer([(401, b"{}", 0.0)]) as server:
    judge = Judge(url=server.url, model="m", retries=3, backoff=0.01)
    assert judge.judge("q", "a").status == "failed"
  assert len(server.requests) == 1


def test_a_timeout_is_retried(tmp_path):
  with JudgeServer(
      [(200, completion("Rating: [[2]]"), 1.0), (200, completion("Rating: [[3]]"), 0.0)]
  ) as server:
    judge = Judge(url=server.url, model="m", timeout=0.2, retries=2, backoff=0.01)
    verdict = judge.judge("q", "a")
  assert (verdict.rating, verdict.status) == (3.0, "rated") and len(server.requests) == 2


def test_the_cache_prevents_a_second_request(tmp_path):
  cache = tmp_path / "judge_cache.jsonl"
  with JudgeServer() as server:
    first = Judge(url=server.url, model="m", cache_path=str(cache))
    assert first.judge("q", "a").rating == 5.0
    assert first.judge("q", "a").rating == 5.0
    resumed = Judge(url=server.url, model="m", cache_path=str(cache))
    assert resumed.judge("q", "a").rating == 5.0 and resumed.requests == 0
    other_model = Judge(url=server.url, model="m2", cache_path=str(cache))
    other_model.judge("q", "a")
  assert len(server.requests) == 2
  assert [len(json.loads(line)) for line in cache.read_text().splitlines()] == [2, 2]


def test_bad_settings_are_named(monkeypatch):
  monkeypatch.delenv("EPI_TEST_MISSING_KEY", raising=False)
  with pytest.raises(ValueError, match="'EPI_TEST_MISSING_KEY', which is not set"):
    Judge(url="http://127.0.0.1:9/v1", model="m", api_key_env="EPI_TEST_MISSING_KEY")
  with pytest.raises(ValueError, match="eval.judge.url and eval.judge.model"):
    Judge(url="http://127.0.0.1:9/v1", model="")
  with pytest.raises(ValueError, match="timeout > 0"):
    Judge(url="http://127.0.0.1:9/v1", model="m", timeout=0)
