"""LoRA against peft on a tiny random llama: logits, files, merge, the scanned layout, training
only the adapters, dropout, errors, memory, and placement on 8 simulated devices."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from epi_jax.models import lora, lora_peft
from epi_jax.train.methods import lora as lora_method
from epi_jax.models import CheckpointMismatchError, Decoder, ModelConfig, from_pretrained
from epi_jax.models import save_pretrained
from epi_jax.models.loss import response_loss

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from hf_reference import left_padded_batch, torch_logits  # noqa: E402

CONFIG = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
HELPER = pathlib.Path(__file__).with_name("sharded_lora.py")


def _random_adapters(model, config, seed):
  """PEFT's initialization with b drawn non-zero, so the adapters change the logits."""
  adapters = lora.init_adapters(model, config, key=jax.random.key(seed))
  flat = traverse_util.flatten_dict(adapters)
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict(
      {
          k: v if k[-1] == "a" else jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype)
          for k, v in flat.items()
      }
  )


def _real(mask):
  return mask.astype(bool)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Our tiny llama and adapters saved, and peft's model with our adapter loaded."""
  root = tmp_path_factory.mktemp("lora")
  config = ModelConfig.tiny("llama")
  model = Decoder(config, rngs=nnx.Rngs(0))
  save_pretrained(model, config, root / "base")
  adapters = _random_adapters(model, CONFIG, seed=1)
  lora_peft.save_adapter(
      model, adapters, CONFIG, root / "adapter", base_model_name_or_path=str(root / "base")
  )
  base = transformers.AutoModelForCausalLM.from_pretrained(
      root / "base", dtype=torch.float32, attn_implementation="eager"
  )
  torch_peft = peft.PeftModel.from_pretrained(base, root / "adapter").eval()
  return root, model, adapters, torch_peft


def test_peft_logits_equal_ours(setup):
  _, model, adapters, torch_peft = setup
  ids, mask = left_padded_batch(seed=0)
  want = torch_logits(torch_peft, ids, mask)
  got = np.asarray(lora.adapted(model, adapters, CONFIG)(ids, mask))
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got[_real(mask)], want[_real(mask)], atol=1e-4, rtol=0)
  base = np.asarray(model(ids, mask))
  assert np.abs(base - got)[_real(mask)].max() > 1e-2  # the adapters matter


def test_adapter_files_equal_what_peft_writes(setup, tmp_path):
  root, _, _, torch_peft = setup
  torch_peft.save_pretrained(tmp_path)
  ours = load_file(root / "adapter" / lora_peft.WEIGHTS_FILE)
  theirs = load_file(tmp_path / lora_peft.WEIGHTS_FILE)
  assert sorted(ours) == sorted(theirs)
  assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in ours
  for name, value in theirs.items():
    assert ours[name].dtype == value.dtype, name
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  assert ours["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)
  assert ours["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
  read = lambda d: json.loads((d / lora_peft.CONFIG_FILE).read_text())
  mine, peft_config = read(root / "adapter"), read(tmp_path)
  peft_config["target_modules"] = sorted(peft_config["target_modules"])
  assert mine == peft_config
  assert sorted(mine) == sorted(peft.LoraConfig().to_dict())  # every field of the pinned peft


def test_merged_equals_unmerged_and_loads_in_transformers(setup, tmp_path):
  _, model, adapters, torch_peft = setup
  merged = lora.merge(model, adapters, CONFIG)
  save_pretrained(merged, model.config, tmp_path)
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  ids, mask = left_padded_batch(seed=1)
  unmerged = np.asarray(lora.adapted(model, adapters, CONFIG)(ids, mask))[_real(mask)]
  np.testing.assert_allclose(
      np.asarray(merged(ids, mask))[_real(mask)], unmerged, atol=1e-6, rtol=0
  )
  np.testing.assert_allclose(
      torch_logits(hf_merged, ids, mask)[_real(mask)],
      torch_logits(torch_peft, ids, mask)[_real(mask)],
      atol=1e-4,
      rtol=0,
  )
  # The base is untouched, the merged weight is W + (alpha / r) a @ b in float64.
  w = np.asarray(model.layers[1].mlp.up[...], np.float64)
  pair = adapters["layers"][1]["mlp"]["up"]
  delta = CONFIG.scale * np.asarray(pair["a"], np.float64) @ np.asarray(pair["b"], np.float64)
  np.testing.assert_allclose(np.asarray(merged.layers[1].mlp.up[...]), w + delta, atol=1e-6)


def test_scanned_layout_reads_writes_and_runs_like_unscanned(setup, tmp_path):
  root, model, adapters, _ = setup
  scanned, _ = from_pretrained(root / "base", scan_layers=True)
  stacked, config = lora_peft.load_adapter(scanned, root / "adapter")
  assert config == CONFIG
  chex.assert_shape(
      [stacked["layers"]["attn"]["o"]["a"], stacked["layers"]["attn"]["o"]["b"]],
      [(2, 64, 4), (2, 4, 64)],
  )
  np.testing.assert_array_equal(
      stacked["layers"]["mlp"]["gate"]["b"][1], adapters["layers"][1]["mlp"]["gate"]["b"]
  )
  ids, mask = left_padded_batch(seed=2)
  np.testing.assert_allclose(
      np.asarray(lora.adapted(scanned, stacked, config)(ids, mask))[_real(mask)],
      np.asarray(lora.adapted(model, adapters, CONFIG)(ids, mask))[_real(mask)],
      atol=1e-5,
  )
  lora_peft.save_adapter(
      scanned, stacked, config, tmp_path, base_model_name_or_path=str(root / "base")
  )
  chex.assert_trees_all_equal(
      load_file(tmp_path / lora_peft.WEIGHTS_FILE),
      load_file(root / "adapter" / lora_peft.WEIGHTS_FILE),
  )
  assert (tmp_path / lora_peft.CONFIG_FILE).read_text() == (
      root / "adapter" / lora_peft.CONFIG_FILE
  ).read_text()


def _batch(seed: int, rows: int = 4, length: int = 16) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "input_ids": jnp.asarray(rng.integers(3, 300, (rows, length)), jnp.int32),
      "loss_mask": jnp.asarray(np.arange(length) >= length // 2, jnp.float32)[None].repeat(rows, 0),
      "segment_ids": jnp.ones((rows, length), jnp.int32),
      "positions": jnp.arange(length, dtype=jnp.int32)[None].repeat(rows, 0),
  }


def test_only_the_adapters_get_gradients_and_optimizer_state(setup, tmp_path):
  _, model, _, _ = setup
  adapters = lora.init_adapters(model, CONFIG, key=jax.random.key(3))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = _batch(0)

  def loss(params, adapters, key):
    adapted = lora.adapted(nnx.merge(graphdef, params, rest), adapters, CONFIG, dropout_key=key)
    total, count = response_loss(adapted, batch)
    return total / count

  grad_params, grad_adapters = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      params, adapters, jax.random.key(0)
  )
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad_params))
  flat = traverse_util.flatten_dict(grad_adapters)
  assert all(np.any(np.asarray(g)) for k, g in flat.items() if k[-1] == "b")
  assert all(not np.any(np.asarray(g)) for k, g in flat.items() if k[-1] == "a")  # b = 0

  tx = optax.adam(1e-2)
  state = tx.init(adapters)
  moments = [x for x in jax.tree.leaves(state) if x.ndim]
  assert (
      sum(x.size for x in moments) == 2 * lora_method.memory_bytes(model, CONFIG).adapter_parameters
  )

  @jax.jit
  def step(adapters, state, key):
    value, grads = jax.value_and_grad(loss, argnums=1)(params, adapters, key)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value

  before = jax.tree.map(np.asarray, params)
  losses = []
  for i in range(8):
    adapters, state, value = step(adapters, state, jax.random.key(i))
    losses.append(float(value))
  assert losses[-1] < losses[0] - 0.05, losses
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)
  with ocp.CheckpointManager(tmp_path) as manager:  # adapters and their Adam state checkpoint
    manager.save(1, args=ocp.args.StandardSave({"adapters": adapters, "opt": state}))
    manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"adapters": adapters, "opt": state})
    restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
  chex.assert_trees_all_equal(restored, {"adapters": adapters, "opt": state})


def test_dropout_drops_input_features_of_the_lora_path(setup):
  _, model, adapters, _ = setup
  config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=("o", "down"))
  chosen = {("layers", i, *lora.TARGETS[t]): None for i in (0, 1) for t in config.targets}
  sub = traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(adapters).items() if k[:-1] in chosen}
  )

  def deltas(key):
    out = lora.adapted(model, sub, config, dropout_key=key)
    return np.asarray(out.layers[1].mlp.down[...]) - np.asarray(model.layers[1].mlp.down[...])

  pair = sub["layers"][1]["mlp"]["down"]
  full = config.scale * np.asarray(pair["a"], np.float64) @ np.asarray(pair["b"], np.float64)
  np.testing.assert_allclose(deltas(None), full, atol=1e-6)
  first, second = deltas(jax.random.key(0)), deltas(jax.random.key(1))
  kept = np.abs(first).max(axis=1) > 0  # rows of down [F, D] are the LoRA path's input features
  np.testing.assert_allclose(first[kept], 2 * full[kept], atol=1e-6)
  assert 0.3 < kept.mean() < 0.7, kept.mean()
  assert not np.array_equal(first, second)


def test_bad_config_and_adapters_are_named(setup, tmp_path):
  root, model, adapters, _ = setup
  with pytest.raises(ValueError, match=r"rank=0.*dropout=1\.0.*targets"):
    lora.LoraConfig(rank=0, dropout=1.0, targets=("q", "qkv"))
  broken = traverse_util.flatten_dict(adapters)
  del broken[("layers", 0, "attn", "q", "a")]
  broken[("layers", 1, "mlp", "up", "b")] = jnp.zeros((3, 128))
  with pytest.raises(
      ValueError,
      match=r"missing layers/0/attn/q/a(.|\n)*layers/1/mlp/up/b: "
      r"shape \(3, 128\), expected \(4, 128\)",
  ):
    lora.adapted(model, traverse_util.unflatten_dict(broken), CONFIG)
  folder = tmp_path / "dora"
  folder.mkdir()
  raw = json.loads((root / "adapter" / lora_peft.CONFIG_FILE).read_text())
  (folder / lora_peft.CONFIG_FILE).write_text(json.dumps({**raw, "use_dora": True}))
  with pytest.raises(CheckpointMismatchError, match="use_dora=True is not supported"):
    lora_peft.load_adapter(model, folder)
  (folder / lora_peft.CONFIG_FILE).write_text(json.dumps({**raw, "target_modules": ["q_proj"]}))
  name = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
  save_file(
      {
          name.format(0, "A"): np.zeros((4, 64), np.float32),
          name.format(1, "A"): np.zeros((4, 65), np.float32),
          name.format(1, "B"): np.zeros((64, 4), np.float32),
          name.format(9, "A"): np.zeros((4, 64), np.float32),
      },
      folder / lora_peft.WEIGHTS_FILE,
  )
  with pytest.raises(CheckpointMismatchError) as error:
    lora_peft.load_adapter(model, folder)
  message = str(error.value)
  assert "layers.0.self_attn.q_proj.lora_B.weight" in message  # missing
  assert "layers.9.self_attn.q_proj.lora_A.weight" in message  # unexpected
  assert "shape (4, 65), expected (4, 64)" in message


def test_memory_bytes_counts_the_adapters(setup):
  _, model, _, _ = setup
  c = model.config
  heads, kv_heads = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  mlp = (c.hidden_size, c.intermediate_size)
  # (in, out) of q, k, v, o, gate, up, down
  per_layer = [
      (c.hidden_size, heads),
      (c.hidden_size, kv_heads),
      (c.hidden_size, kv_heads),
      (heads, c.hidden_size),
      mlp,
      mlp,
      mlp[::-1],
  ]
  count = c.num_layers * sum(CONFIG.rank * (i + o) for i, o in per_layer)
  kernels = c.num_layers * sum(i * o for i, o in per_layer) * 4
  largest = max(i * o for i, o in per_layer) * 4
  memory = lora_method.memory_bytes(model, CONFIG)
  adapters = lora.init_adapters(model, CONFIG, key=jax.random.key(0))
  assert memory.adapter_parameters == count == sum(x.size for x in jax.tree.leaves(adapters))
  assert memory.adapters == memory.adapter_grads == 4 * count
  assert memory.adapter_adam == 8 * count
  assert memory.effective_weights == kernels
  assert memory.effective_weight_grads == largest
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert memory.per_base_parameter == pytest.approx(memory.total / n)
  scan_config = dataclasses.replace(c, scan_layers=True)
  abstract = nnx.eval_shape(lambda: Decoder(scan_config, rngs=nnx.Rngs(0)))
  scanned = lora_method.memory_bytes(abstract, CONFIG)
  assert scanned.adapter_parameters == count and scanned.effective_weight_grads == kernels


def test_adapters_sit_on_the_models_mesh(setup):
  root, _, _, _ = setup
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, str(HELPER), str(root / "base"), str(root / "adapter")],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(run.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  for scan, lead in (("False", []), ("True", [None])):
    r = report[f"scan={scan}"]
    assert r["q_a_spec"] == lead + ["fsdp", None], r  # a: [D, r], D over fsdp like q's embed
    assert r["q_b_spec"] == lead + [None, "tensor"], r  # b: [r, H*Dh], heads over tensor
    assert r["o_a_spec"] == lead + ["tensor", None], r
    assert r["o_b_spec"] == lead + [None, "fsdp"], r
    assert r["max_abs_diff"] < 1e-5, r
