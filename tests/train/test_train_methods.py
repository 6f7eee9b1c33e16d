"""Methods as rows of the trainer: the registry, LoRA and EWC through the loop, resume."""

import json
import pathlib
import re
import shutil

import chex
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import epi_jax.data as data
from epi_jax._src import ewc
from epi_jax.models import lora, lora_peft
from epi_jax.train.methods import ewc as ewc_method
from epi_jax.train.checkpointing import RunCheckpoints
from epi_jax.train.export import export_run
from epi_jax.train.loading import ConfigError, load_config
from epi_jax.train.loop import train
from epi_jax.train.methods import METHODS, Run, make_method
from epi_jax.train.methods.ewc import FISHER_SEED
from epi_jax.train.methods.lora import LoraParam
from epi_jax.train.model import build_model
from epi_jax.train.setup import init_state
from epi_jax.train.sharding import build_mesh, like_params, put_batch
from epi_jax.train.step import make_train_step
from epi_jax.train.tasks import load_tasks, stage_iterators
from tiny_run import tiny_config_file

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_loop_never_tests_a_method_name():
  for module in ("loop.py", "step.py", "optimizer.py", "tasks.py"):
    source = (ROOT / "epi_jax" / "train" / module).read_text()
    source = source.replace('mask_history == "full"', "")  # a checkpoint option, not a method
    assert not re.search(r"method\.type\s*(==|!=|in\b)", source), module
    for name in METHODS:
      assert not re.search(rf"[\"']{name}[\"']", source), (module, name)


def test_unknown_method_and_bad_options_are_refused_by_name(tmp_path):
  with pytest.raises(ConfigError, match=r"method\.type: unknown method 'lorax'"):
    load_config(tiny_config_file(tmp_path), ["method.type=lorax"])
  with pytest.raises(ConfigError, match=r"method\.lora: .*targets"):
    load_config(tiny_config_file(tmp_path), ["method.type=lora", "method.lora.targets=[qq]"])
  with pytest.raises(ConfigError, match=r"method\.ewc\.examples_per_chunk: must divide"):
    load_config(tiny_config_file(tmp_path), ["method.type=ewc", "method.ewc.examples_per_chunk=3"])


def _param_values(module):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


@pytest.mark.slow
def test_lora_trains_only_adapters_and_saves_peft_and_merged_model(tmp_path):
  config = load_config(
      tiny_config_file(tmp_path),
      [
          "method.type=lora",
          "method.lora.rank=4",
          "method.lora.targets=[q, v, down]",
          "checkpoint.mask_history=stats",
      ],
  )
  summary = train(config, run_dir=str(tmp_path / "run"))
  assert summary["lora"]["adapter_parameters"] > 0 and "mask_overlap_first" not in summary

  # The merged model equals the PEFT adapter on the initialization: the base did not move.
  base = build_model(config.model, seed=config.train.seed)
  adapters, lora_config = lora_peft.load_adapter(base, tmp_path / "run" / "adapter")
  assert lora_config.rank == 4 and set(lora_config.targets) == {"q", "v", "down"}
  ids = np.random.default_rng(0).integers(3, base.config.vocab_size, (2, 12)).astype(np.int32)
  ours = np.asarray(lora.adapted(base, adapters, lora_config)(ids))
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
  with torch.no_grad():
    merged = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(merged, ours, atol=2e-5)
  assert np.abs(ours - np.asarray(base(ids))).max() > 1e-4  # the adapters moved something
  # Its last checkpoint exports the same merged model.
  out = export_run(str(tmp_path / "run"))
  chex.assert_trees_all_equal(
      load_file(f"{out}/model.safetensors"),
      load_file(tmp_path / "run" / "model" / "model.safetensors"),
  )


def _trainable(config, *, resuming):
  """(the method's Trainable, the run's TaskData, mesh), built as the loop builds them."""
  mesh = build_mesh(config.mesh)
  task_data = load_tasks(config)
  method = make_method(config)
  run = Run(
      config=config,
      task_data=task_data,
      stages=method.stages(),
      stage_steps=[9],
      mesh=mesh,
      num_micro=2,
      resuming=resuming,
  )
  return method.trainable(build_model(config.model, seed=0, mesh=mesh), run), task_data, mesh


def test_lora_optimizer_state_holds_adapters_only(tmp_path):
  config = load_config(tiny_config_file(tmp_path), ["method.type=lora"])
  trainable, _, _ = _trainable(config, resuming=False)
  optimizer = nnx.Optimizer(trainable.module, trainable.tx, wrt=trainable.wrt)
  adapter_sizes = sorted(x.size for x in jax.tree.leaves(nnx.state(trainable.module, LoraParam)))
  moments = sorted(x.size for x in jax.tree.leaves(nnx.state(optimizer)) if np.ndim(x) > 0)
  assert moments == sorted(adapter_sizes * 2)  # mu and nu of each adapter, nothing of the base


@pytest.mark.slow
def test_ewc_consolidates_each_stage_and_resumes_bit_identical(tmp_path):
  overrides = [
      "method.type=ewc",
      "method.ewc.lam=50.0",
      "method.ewc.fisher_batches=2",
      "data.tasks=[logic_choice, rewrite, arithmetic]",
      "checkpoint.mask_history=stats",
  ]
  config = load_config(tiny_config_file(tmp_path), overrides)
  full = train(config, run_dir=str(tmp_path / "full"))
  lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  consolidated = [r for r in records if r["kind"] == "method"]
  assert [r["consolidations"] for r in consolidated] == [1, 2]  # not after the last stage
  penalties = [r["ewc_penalty"] for r in records if r["kind"] == "train"]
  assert penalties[:3] == [0.0] * 3 and all(p > 0 for p in penalties[3:])

  # The Fisher of stage 0 is fisher_diagonal of its batches at the stage-0 weights, and the
  # checkpoint of step 3 holds it.
  trainable, task_data, mesh = _trainable(config, resuming=True)
  graphdef, state = init_state(trainable.module, trainable.tx, mesh)
  ckpt = RunCheckpoints(str(tmp_path / "full"), keep=10)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  state, _, _ = ckpt.restore(3, abstract, with_masks=False)
  ckpt.close()
  model, optimizer = nnx.merge(graphdef, state)
  [saved] = [
      x
      for x in jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, ewc.EWCState))
      if isinstance(x, ewc.EWCState)
  ]
  saved = jax.tree.map(
      lambda v: np.asarray(v.get_value()), saved, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  examples = task_data.train["logic_choice"]
  it = data.BatchIterator(
      examples,
      batch_size=8,
      seq_len=config.data.seq_len,
      pad_id=task_data.encoder.pad_id,
      seed=FISHER_SEED,
      pack=False,
  )
  fisher = ewc_method.fisher_diagonal(model, [put_batch(next(it), mesh) for _ in range(2)])
  chex.assert_trees_all_close(
      jax.tree.map(np.asarray, nnx.to_pure_dict(saved.fisher)),
      jax.tree.map(np.asarray, nnx.to_pure_dict(fisher)),
      rtol=1e-6,
      atol=1e-12,
  )
  chex.assert_trees_all_close(
      nnx.to_pure_dict(saved.anchor),  # F theta / F: to rounding
      jax.tree.map(lambda x: x.astype(np.float32), _param_values(model)),
      rtol=1e-6,
      atol=1e-9,
  )

  shutil.copytree(tmp_path / "full", tmp_path / "cut")  # interrupted after step 4 (stage 1)
  for step in ("6", "8", "9"):
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / step, ignore_errors=True)
  resumed = train(config, run_dir=str(tmp_path / "cut"), resume=True)
  assert resumed["params_sha256"] == full["params_sha256"]
  assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


@pytest.mark.parametrize("lora_lr, peak", [(0.0, 3e-3), (3e-2, 3e-2)])
def test_lora_adapters_train_at_method_lora_lr(tmp_path, lora_lr, peak):
  """Adam's first step moves each entry by about the peak rate (no warm-up): the adapters'
  first update is ``method.lora.lr``-sized, ``optim.lr``-sized when it is unset."""
  config = load_config(
      tiny_config_file(tmp_path),
      ["method.type=lora", f"method.lora.lr={lora_lr}", "optim.warmup_ratio=0.0"],
  )
  assert make_method(config).peak_learning_rate() == peak
  trainable, task_data, mesh = _trainable(config, resuming=False)
  graphdef, state = init_state(trainable.module, trainable.tx, mesh, wrt=trainable.wrt)
  before = jax.tree.map(np.asarray, nnx.merge(graphdef, state)[0].adapter_values())
  step = make_train_step(graphdef, 2, wrt=trainable.wrt, shardings=like_params(state, mesh))
  it = stage_iterators(config, make_method(config).stages(), task_data)[0]
  state, _ = step(state, put_batch(next(it), mesh))
  after = nnx.merge(graphdef, state)[0].adapter_values()
  moved = [
      np.abs(np.asarray(x) - np.asarray(y)).max()
      for x, y in zip(*map(jax.tree.leaves, (after, before)))
  ]
  # b starts at 0, so a gets no gradient at step 1; every b moves by the rate (|g| >> eps).
  np.testing.assert_allclose(max(moved), peak, rtol=1e-3)
  assert min(moved) == 0.0
