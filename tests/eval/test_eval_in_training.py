"""The five datasets through the trainer with their own metrics and a judge on 127.0.0.1."""

import json
import os
import pathlib
import sys

import pytest
from flax import nnx

from epi_jax.models import Decoder, ModelConfig, save_pretrained
from epi_jax.train.loading import load_config
from epi_jax.train.loop import train
from eval_judge_server import JudgeServer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "data"))
from data_tokenizers import CHATML, byte_level_tokenizer  # noqa: E402

KEY = "sk-e2e-fedcba9876543210"


def records(name, i):
  return {
      "gsm8k": {
          "question": f"Ann has {i} pens and buys 2. How many?",
          "answer": f"{i}+2=<<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}",
      },
      "code_alpaca": {"instruction": f"Add {i} to x.", "input": "", "output": f"x = x + {i}"},
      "logiqa": {
          "context": f"All cats purr. Tom is cat {i}.",
          "query": "Which follows?",
          "options": ["Tom barks", "Tom purrs", "Tom flies", "None"],
          "correct_option": i % 4,
      },
      "alpaca": {"instruction": f"Name color {i}.", "input": "", "output": "Blue."},
      "ultrachat": {
          "messages": [
              {"role": "user", "content": f"Hi {i}!"},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye."},
              {"role": "assistant", "content": "Goodbye."},
          ]
      },
  }[name]


@pytest.mark.slow
def test_every_metric_lands_in_the_summary_and_the_key_in_no_file(tmp_path, monkeypatch):
  monkeypatch.setenv("EPI_TEST_JUDGE_KEY", KEY)
  names = ["gsm8k", "code_alpaca", "logiqa", "alpaca", "ultrachat"]
  files = {}
  for name in names:
    files[name] = tmp_path / f"{name}.jsonl"
    files[name].write_text("".join(json.dumps(records(name, i)) + "\n" for i in range(9)))
  checkpoint = tmp_path / "tiny"
  config = ModelConfig.tiny("llama")
  save_pretrained(
      Decoder(config, rngs=nnx.Rngs(0)), config, checkpoint, tokenizer=byte_level_tokenizer(CHATML)
  )
  run_dir = tmp_path / "run"
  with JudgeServer() as server:
    overrides = [
        f"model.checkpoint={checkpoint}",
        "data.source=hf",
        f"data.tasks={names}",
        f"data.files={json.dumps({k: str(v) for k, v in files.items()})}",
        "data.n_train=6",
        "data.n_eval=3",
        "data.seq_len=160",
        "method.interval=1",
        "method.p=0.05",
        "optim.batch_size=2",
        "train.steps_per_stage=1",
        "checkpoint.every=0",
        "eval.max_new_tokens=6",
        "eval.batch_size=8",
        f"eval.judge.url={server.url}",
        "eval.judge.model=judge",
        "eval.judge.api_key_env=EPI_TEST_JUDGE_KEY",
        "eval.judge.retries=1",
        "log.progress=false",
    ]
    path = tmp_path / "c.yaml"
    path.write_text("")
    summary = train(load_config(str(path), overrides), run_dir=str(run_dir))
    asked = len(server.requests)
    # At most 5 stages x (alpaca, ultrachat) x 3 examples; the same answer is asked about once.
    assert 0 < asked <= 5 * 2 * 3
    prompts = [r["body"]["messages"][1]["content"] for r in server.requests]
    assert len(set(prompts)) == len(prompts)
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    # A rerun in the same directory finds every judgment in the cache.
    again = train(load_config(str(path), overrides), run_dir=str(run_dir))
    assert len(server.requests) == asked and again["accuracy_matrix"] == summary["accuracy_matrix"]

  final = summary["eval_metrics"][-1]["results"]
  assert set(final["gsm8k"]) == {"exact_match_strict", "exact_match_flexible", "n"}
  assert set(final["logiqa"]) == {"acc", "acc_norm", "n"}
  assert {
      "codebleu",
      "ngram_match",
      "weighted_ngram_match",
      "syntax_match",
      "dataflow_match",
      "bleu",
  } <= set(final["code_alpaca"])
  for task in ("alpaca", "ultrachat"):
    assert final[task]["judge_score"] == 5.0 and final[task]["judge_rated"] == 3
  assert summary["final_accuracy"]["alpaca"] == 5.0
  assert summary["final_accuracy"]["logiqa"] == final["logiqa"]["acc"]
  assert summary["avg_norm_score"]["proxy_tasks"] == []
  assert len(summary["eval_metrics"]) == 5 and summary["eval_metrics"][0]["eval_time_s"] > 0
  with open(run_dir / "metrics.jsonl") as f:
    kinds = [json.loads(line)["kind"] for line in f]
  assert kinds.count("eval_metrics") == 5
  for folder, _, filenames in os.walk(run_dir):
    for filename in filenames:
      with open(os.path.join(folder, filename), "rb") as f:
        assert KEY.encode() not in f.read(), os.path.join(folder, filename)
