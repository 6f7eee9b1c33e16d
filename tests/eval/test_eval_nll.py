"""Held-out response NLL: per example against a NumPy float64 reference from the model's
logits, the NLL matrix / forgetting / BWT against hand-computed values on random matrices,
the same examples for every method of a data seed, and the before-training cache."""

import json
import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

import epi_jax.data as data
from epi_jax.eval.heldout_nll import HeldoutNll
from epi_jax.eval.nll import nll_forgetting, nll_row, response_nlls, task_nll
from epi_jax.models import Decoder, ModelConfig
from epi_jax.train.loading import ConfigError, load_config
from epi_jax.train.loop import train
from epi_jax.train.tasks import _splits, load_tasks, probe_examples

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
from tiny_run import tiny_config_file  # noqa: E402


@pytest.fixture(scope="module")
def model():
  return Decoder(
      ModelConfig.tiny("llama", vocab_size=data.byte_tokenizer.VOCAB_SIZE), rngs=nnx.Rngs(0)
  )


@nnx.jit
def forward(model, ids):
  return model(ids)


def _reference(model, encoder, chat):
  """(summed NLL over the loss-mask tokens, their count) of one unpadded row, float64."""
  ids, mask = encoder.encode_chat(chat)
  logits = np.asarray(forward(model, ids[None].astype(np.int32)), np.float64)[0, :-1]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  token = logp[np.arange(len(ids) - 1), ids[1:]]
  return -np.sum(token[mask[1:]]), int(mask[1:].sum())


def test_response_nll_equals_a_float64_reference(model):
  encoder = data.ByteTokenizer()
  chats = [
      chat
      for task in ("arithmetic", "dialogue", "rewrite")
      for chat in data.task_splits(task, seed=3, n_train=0, n_eval=5)[1]
  ]  # lengths from ~20 to ~60 tokens: several buckets, a partial batch
  got = response_nlls(model, encoder, chats, batch_size=4)
  for chat, (nll_sum, tokens) in zip(chats, got):
    want_sum, want_tokens = _reference(model, encoder, chat)
    assert tokens == want_tokens > 0
    np.testing.assert_allclose(nll_sum, want_sum, rtol=1e-5)
  # the dialogue's loss mask covers both assistant turns, as the training loss does
  assert got[5][1] > len(chats[5][-1]["content"]) + 1


def test_matrix_forgetting_and_bwt_by_hand():
  rng = np.random.default_rng(0)
  tasks = ["a", "b", "c", "d", "probe"]
  stages = [["a"], ["b", "c"], ["d"]]
  values = rng.uniform(0.5, 3.0, (4, len(tasks)))  # rows: before, after stage 0, 1, 2
  before, *matrix = [dict(zip(tasks, row)) for row in values]
  out = nll_forgetting(before, matrix, stages)
  final, own = values[3], {"a": values[1, 0], "b": values[2, 1], "c": values[2, 2]}
  want = {t: final[tasks.index(t)] - own[t] for t in own}
  assert out["forgetting"] == pytest.approx(want | {"d": None})
  assert out["bwt"] == pytest.approx(np.mean(list(want.values())))
  assert out["change_from_before"] == pytest.approx(dict(zip(tasks, values[3] - values[0])))
  # per-example scores -> a task's mean of nll_sum / tokens, examples without tokens left out
  assert task_nll([[3.0, 2], [1.0, 4], [9.0, 0]]) == pytest.approx((1.5 + 0.25) / 2)
  assert task_nll([[1.0, 0]]) is None
  assert nll_row({"a": [[2.0, 4]], "b": [[1.0, 1]]}) == {"a": 0.5, "b": 1.0}


def _tracker(task_data, config, results=None):
  return HeldoutNll(
      task_data.encoder,
      task_data.evaluation | task_data.probes,
      stream=config.data.tasks,
      probes=config.eval.probe_tasks,
      examples=config.eval.nll_examples or config.data.n_eval,
      batch_size=4,
      results={} if results is None else results,
  )


def test_every_method_of_a_seed_scores_the_same_examples(tmp_path):
  path = tiny_config_file(tmp_path)
  base = ["eval.analyses=[nll]", "eval.probe_tasks=[dialogue]", "eval.nll_examples=3"]
  digests = {}
  for method in ("multistage", "epi", "lora", "ewc", "full"):
    config = load_config(path, [*base, f"method.type={method}"])
    digests[method] = _tracker(load_tasks(config), config).examples_digest()
  assert len(set(digests.values())) == 1
  other_seed = load_config(path, [*base, "data.seed=1"])
  assert _tracker(load_tasks(other_seed), other_seed).examples_digest() != digests["epi"]
  more = load_config(path, [*base, "eval.nll_examples=4"])
  assert _tracker(load_tasks(more), more).examples_digest() != digests["epi"]


def test_before_training_is_read_back_from_the_cache(tmp_path, model):
  config = load_config(
      tiny_config_file(tmp_path), ["eval.analyses=[nll]", "eval.probe_tasks=[arithmetic]"]
  )
  task_data = load_tasks(config)
  first = _tracker(task_data, config)
  calls = []
  key = lambda: calls.append(1) or first.cache_key("params", "config")  # noqa: E731
  first.before_training(model, cache_dir=str(tmp_path / "cache"), key=key, writes=True)
  assert first.results["before_cache"]["hit"] is False
  assert set(first.results["before"]) == {"logic_choice", "rewrite", "arithmetic"}
  second = _tracker(task_data, config)
  second.before_training(None, cache_dir=str(tmp_path / "cache"), key=key, writes=True)
  assert second.results["before_cache"]["hit"] is True and len(calls) == 2
  assert second.results["before"] == first.results["before"]
  assert first.cache_key("other params", "config") != first.cache_key("params", "config")
  stages = [["logic_choice", "rewrite"]]  # one stage: the probe is scored after it
  row = second.after_stage(model, stages)
  summary = second.summary(stages)
  assert summary["matrix"][0] == {
      "point": "before",
      "trained": [],
      "nll": nll_row(first.results["before"]),
  }
  assert summary["matrix"][1]["nll"] == row and summary["probe"]["arithmetic"]["change"] == 0.0
  stream = _tracker(task_data, config)  # two stages: each task from its own stage on
  firsts = [set(stream.after_stage(model, [["logic_choice"], ["rewrite"]])) for _ in range(2)]
  assert firsts == [{"logic_choice"}, {"logic_choice", "rewrite", "arithmetic"}]
  records = second.per_example([["logic_choice"], ["rewrite"]])["records"]
  assert len(records) == 2 * 3 * 4 and json.loads(json.dumps(records)) == records
  assert records[0] == {
      "point": "before",
      "task": "logic_choice",
      "index": 0,
      "nll_sum": first.results["before"]["logic_choice"][0][0],
      "tokens": first.results["before"]["logic_choice"][0][1],
  }


def test_an_hf_probe_takes_the_first_rows_of_its_file(tmp_path):
  rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(6)]
  path = tmp_path / "alpaca.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  config = load_config(
      tiny_config_file(tmp_path),
      [
          "data.source=hf",
          "data.tasks=[gsm8k]",
          f"data.files={{alpaca: {path}}}",
          "data.n_train=100",
          "eval.analyses=[nll]",
          "eval.probe_tasks=[alpaca]",
      ],
  )
  probes = probe_examples(config, "alpaca")
  assert [e.reference for e in probes] == ["0", "1", "2", "3"]  # n_eval = 4, whatever n_train


def test_data_skip_moves_an_hf_task_past_rows_a_study_uses(tmp_path):
  """Tuning runs take rows after the study's (data.skip): training and held-out rows move,
  a probe keeps its first rows."""
  rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(10)]
  path = tmp_path / "alpaca.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  sets = ["data.source=hf", "data.tasks=[alpaca]", f"data.files={{alpaca: {path}}}"]
  config = load_config(
      tiny_config_file(tmp_path), [*sets, "data.n_train=3", "data.n_eval=2", "data.skip=4"]
  )
  train_chats, held_out = _splits(config, "alpaca")
  assert [c[-1]["content"] for c in train_chats] == ["4", "5", "6"]
  assert [e.reference for e in held_out] == ["7", "8"]
  with pytest.raises(ConfigError, match=r"data\.skip: only data\.source=hf skips rows"):
    load_config(tiny_config_file(tmp_path), ["data.skip=1"])


def test_data_shuffle_draws_each_seeds_rows_from_the_same_pool(tmp_path):
  """data.shuffle: each seed trains and holds out its own draw of the n_train + n_eval rows
  after data.skip; a seed's draw is reproducible; no row outside the pool is used."""
  rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(20)]
  path = tmp_path / "alpaca.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  sets = ["data.source=hf", "data.tasks=[alpaca]", f"data.files={{alpaca: {path}}}"]
  sets += ["data.n_train=6", "data.n_eval=4", "data.skip=3", "data.shuffle=true"]

  def draw(seed):
    config = load_config(tiny_config_file(tmp_path), [*sets, f"data.seed={seed}"])
    train_chats, held_out = _splits(config, "alpaca")
    return [c[-1]["content"] for c in train_chats], [e.reference for e in held_out]

  draws = [draw(seed) for seed in range(3)]
  for train_rows, held_rows in draws:
    assert len(train_rows) == 6 and len(held_rows) == 4
    assert sorted(map(int, train_rows + held_rows)) == list(range(3, 13))
  assert draw(1) == draws[1]
  assert len({tuple(t) for t, _ in draws}) == 3  # the training subset moves with the seed
  with pytest.raises(ConfigError, match=r"data\.shuffle: only data\.source=hf draws rows"):
    load_config(tiny_config_file(tmp_path), ["data.shuffle=true"])


def test_examples_whose_response_starts_past_seq_len_are_left_out(tmp_path):
  """They would train nothing (their loss mask is cut away): load_tasks leaves them out and
  counts them; a task with none left is a DataError naming data.seq_len."""
  encoder = data.ByteTokenizer()
  chats, _ = data.task_splits("rewrite", seed=0, n_train=48, n_eval=4)
  starts = [int(np.argmax(e.loss_mask)) for e in data.encode_chats(chats, encoder)]
  sets = ["data.tasks=[rewrite]", "method.stages=[[rewrite]]", "data.seed=0"]
  task_data = load_tasks(load_config(tiny_config_file(tmp_path), [*sets, "data.seq_len=30"]))
  kept = [int(np.argmax(e.loss_mask)) for e in task_data.train["rewrite"]]
  assert kept == [s for s in starts if s < 30] and task_data.left_out == {
      "rewrite": sum(s >= 30 for s in starts)
  }
  assert 0 < task_data.left_out["rewrite"] < 48
  assert load_tasks(load_config(tiny_config_file(tmp_path), sets)).left_out == {}
  with pytest.raises(data.DataError, match=r"data\.seq_len=20: every training example of rewrite"):
    load_tasks(load_config(tiny_config_file(tmp_path), [*sets, "data.seq_len=20"]))


def test_bad_nll_options_are_named(tmp_path):
  path = tiny_config_file(tmp_path)
  cases = [
      (
          ["eval.analyses=[nll]", "eval.nll_examples=5"],
          r"eval\.nll_examples: must be <= data\.n_eval=4",
      ),
      (
          ["eval.analyses=[flip_rate]", "eval.probe_tasks=[dialogue]"],
          r"eval\.probe_tasks: .*continual \(their metric\) or nll: add one to eval\.analyses",
      ),
      (["eval.analyses=[nll]", "eval.probe_tasks=[rewrite]"], r"rewrite is trained"),
      (["eval.analyses=[nll]", "eval.probe_tasks=[alpaca]"], r"unknown synthetic task 'alpaca'"),
      (
          ["eval.analyses=[nll]", "eval.probe_tasks=[dialogue, dialogue]"],
          r"dialogue more than once",
      ),
  ]
  for overrides, message in cases:
    with pytest.raises(ConfigError, match=message):
      load_config(path, overrides)


@pytest.mark.slow
def test_runs_of_two_methods_share_the_before_training_evaluation(tmp_path):
  """multistage computes it, LoRA (whose untrained adapted model has the base's weights) reads
  it from the cache; the per-example file holds every point."""
  path = tiny_config_file(tmp_path)
  nll = ["eval.analyses=[nll]", f"eval.nll_cache={tmp_path / 'cache'}", "eval.nll_examples=3"]
  first = train(
      load_config(path, [*nll, "method.type=multistage", "eval.metric_examples=2"]),
      run_dir=str(tmp_path / "a"),
  )
  second = train(load_config(path, [*nll, "method.type=lora"]), run_dir=str(tmp_path / "b"))
  a, b = first["analyses"]["nll"], second["analyses"]["nll"]
  assert (a["before_cache"]["hit"], b["before_cache"]["hit"]) == (False, True)
  assert a["before_cache"]["file"] == b["before_cache"]["file"]
  assert a["matrix"][0] == b["matrix"][0]
  assert a["matrix"][1]["nll"] != b["matrix"][1]["nll"]  # the methods trained differently
  for run, scored in (("a", 2), ("b", 4)):  # eval.metric_examples; else all data.n_eval = 4
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in lines if '"eval_metrics"' in x]
    counts = {v for e in evals for k, v in e.items() if k.endswith("/n")}
    assert evals and counts == {scored}, evals
  records = json.loads((tmp_path / "b" / "heldout_nll.json").read_text())
  assert records["points"] == ["before", "after_stage_0", "after_stage_1"]
  scored = {}
  for r in records["records"]:
    scored.setdefault(r["point"], set()).add(r["task"])
  # every task before training, then each from its own stage on
  assert scored == {
      "before": {"logic_choice", "rewrite"},
      "after_stage_0": {"logic_choice"},
      "after_stage_1": {"logic_choice", "rewrite"},
  }
  assert len(records["records"]) == 5 * 3
  assert b["matrix"][1]["nll"]["rewrite"] is None and b["forgetting"]["logic_choice"] is not None
