"""EWC: per-example losses and the diagonal empirical Fisher of a tiny llama against per-example
float64 gradients of transformers' implementation; the offline and online penalties against
NumPy float64."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx

from epi_jax._src import ewc
from epi_jax.train.methods import ewc as ewc_method
from epi_jax.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from epi_jax.models.hf_names import NameMap, from_hf_layout

LENGTH = 12


def _batch(rng, lengths, prompts):
  """Right-padded rows [B, LENGTH]: row r has lengths[r] tokens, the first prompts[r] of them
  prompt (loss weight 0), the rest response."""
  rows = len(lengths)
  t = np.arange(LENGTH)[None]
  real = t < np.asarray(lengths)[:, None]
  ids = np.where(real, rng.integers(3, 300, (rows, LENGTH)), 0)
  return {
      "input_ids": ids.astype(np.int32),
      "loss_mask": (real & (t >= np.asarray(prompts)[:, None])).astype(np.float32),
      "segment_ids": real.astype(np.int32),
      "positions": np.where(real, t, 0).astype(np.int32),
  }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Our tiny llama, the same weights in float64 transformers, and two batches; row 2 of the
  first batch has no response token."""
  config = ModelConfig.tiny("llama")
  model = Decoder(config, rngs=nnx.Rngs(0))
  path = tmp_path_factory.mktemp("ewc")
  save_pretrained(model, config, path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float64, attn_implementation="eager"
  ).eval()
  rng = np.random.default_rng(0)
  batches = [_batch(rng, [12, 9, 7, 12], [4, 3, 7, 1]), _batch(rng, [10, 12, 5, 8], [2, 6, 1, 3])]
  return model, reference, batches


def _torch_example(reference, batch, r):
  """(loss, {name: float64 gradient}) of row r alone, run on its unpadded tokens."""
  n = int(batch["segment_ids"][r].sum())
  ids = torch.from_numpy(batch["input_ids"][r, :n].astype(np.int64))
  weight = torch.from_numpy(batch["loss_mask"][r, 1:n].astype(np.float64))
  reference.zero_grad()
  logits = reference(input_ids=ids[None]).logits[0]
  ce = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
  loss = (ce * weight).sum() / weight.sum().clamp(min=1.0)
  loss.backward()
  return float(loss.detach()), {k: p.grad.numpy().copy() for k, p in reference.named_parameters()}


def test_example_losses_equal_float64_reference(setup):
  model, reference, batches = setup
  losses, counts = ewc_method.example_losses(model, batches[0])
  want = [_torch_example(reference, batches[0], r)[0] for r in range(4)]
  np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), [8, 6, 0, 11])


def test_fisher_equals_mean_squared_float64_gradients(setup):
  model, reference, batches = setup
  sums, examples = {}, 0
  for batch in batches:
    for r in range(4):
      if batch["loss_mask"][r, 1:].sum() == 0:
        continue  # no response token: not an example
      examples += 1
      for name, g in _torch_example(reference, batch, r)[1].items():
        sums[name] = sums.get(name, 0.0) + g * g
  assert examples == 7
  fisher = ewc_method.fisher_diagonal(model, batches)
  ours = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(fisher)}
  names = NameMap("llama")
  assert len(ours) == len(sums)
  for name, total in sums.items():
    path, layout = names.to_ours(name)
    want = from_hf_layout(total / examples, layout, ours[path].shape)
    assert ours[path].dtype == np.float32
    np.testing.assert_allclose(
        ours[path], want, rtol=2e-3, atol=1e-4 * np.abs(want).max(), err_msg=name
    )
    assert np.abs(want).max() > 0, name
  chunked = ewc_method.fisher_diagonal(model, batches, examples_per_chunk=2)
  chex.assert_trees_all_close(chunked, fisher, rtol=1e-5, atol=1e-12)
  with pytest.raises(
      ValueError, match="examples_per_chunk=3 does not divide the 4 rows of batch 0"
  ):
    ewc_method.fisher_diagonal(model, batches, examples_per_chunk=3)


def _tree(rng, zero_fraction=0.0):
  """A small params-like pytree of float32 arrays, some entries exactly 0 when asked."""
  tree = {"w": rng.normal(size=(5, 3)), "layers": [rng.normal(size=(4,)), rng.normal(size=(2, 2))]}
  return jax.tree.map(
      lambda x: jnp.asarray(np.where(rng.random(x.shape) < zero_fraction, 0.0, x), jnp.float32),
      tree,
  )


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _penalty_and_grad(params, state, lam):
  fn = functools.partial(ewc.penalty, lam=lam)
  return jax.jit(jax.value_and_grad(fn))(params, state)


def test_offline_penalty_is_the_sum_of_every_stages_penalty():
  rng = np.random.default_rng(1)
  stages = [(_tree(rng), jax.tree.map(jnp.square, _tree(rng, zero_fraction=0.3))) for _ in range(3)]
  state = ewc.init(stages[0][0])
  assert float(ewc.penalty(_tree(rng), state, lam=3.0)) == 0.0
  for theta, fisher in stages:
    state = ewc.consolidate(state, theta, fisher)
  assert int(state.consolidations) == 3
  theta = _tree(rng)
  lam = 2.5
  value, grad = _penalty_and_grad(theta, state, lam)
  x = _f64(theta)
  want = sum(
      lam / 2 * np.sum(f * (xi - t) ** 2)
      for anchor, fisher in stages
      for xi, t, f in zip(x, _f64(anchor), _f64(fisher))
  )
  want_grad = [
      sum(
          lam * f * (xi - t)
          for t, f in zip([_f64(a)[i] for a, _ in stages], [_f64(f)[i] for _, f in stages])
      )
      for i, xi in enumerate(x)
  ]
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(grad), want_grad):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-6)
  summed = [sum(_f64(f)[i] for _, f in stages) for i in range(len(x))]
  for got, ref in zip(_f64(state.fisher), summed):
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_online_penalty_decays_the_fisher_and_anchors_at_the_latest_weights():
  rng = np.random.default_rng(2)
  stages = [(_tree(rng), jax.tree.map(jnp.square, _tree(rng))) for _ in range(3)]
  gamma, lam = 0.5, 4.0
  state = ewc.init(stages[0][0])
  for theta, fisher in stages:
    state = ewc.consolidate(state, theta, fisher, gamma=gamma)
  f = [gamma * (gamma * a + b) + c for a, b, c in zip(*(_f64(fi) for _, fi in stages))]
  for got, ref in zip(_f64(state.fisher), f):
    np.testing.assert_allclose(got, ref, rtol=1e-6)
  chex.assert_trees_all_equal(state.anchor, stages[-1][0])
  assert float(state.constant) == 0.0
  theta = _tree(rng)
  value, grad = _penalty_and_grad(theta, state, lam)
  x, anchor = _f64(theta), _f64(stages[-1][0])
  np.testing.assert_allclose(
      float(value),
      sum(lam / 2 * np.sum(fi * (xi - a) ** 2) for xi, a, fi in zip(x, anchor, f)),
      rtol=1e-5,
  )
  for got, xi, a, fi in zip(jax.tree.leaves(grad), x, anchor, f):
    np.testing.assert_allclose(np.asarray(got), lam * fi * (xi - a), rtol=1e-5, atol=1e-6)


def test_state_works_on_model_params_and_keeps_its_own_copy(setup):
  model, _, batches = setup
  params = nnx.state(model, nnx.Param)
  fisher = ewc_method.fisher_diagonal(model, batches[:1])
  state = ewc.consolidate(ewc.init(params), params, fisher, gamma=0.9)
  assert float(ewc.penalty(params, state, lam=1.0)) == 0.0
  moved = jax.tree.map(lambda p: p + 0.01, params)
  want = 0.5 * sum(np.sum(np.asarray(f, np.float64)) * 1e-4 for f in jax.tree.leaves(fisher))
  np.testing.assert_allclose(float(ewc.penalty(moved, state, lam=1.0)), want, rtol=1e-3)
  a, b = jax.tree.leaves(state.anchor)[0], jax.tree.leaves(params)[0]
  assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()  # survives donating params


def test_bad_arguments_are_named():
  state = ewc.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="gamma=1.5"):
    ewc.consolidate(state, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, gamma=1.5)
  with pytest.raises(ValueError, match="lam=-1"):
    ewc.penalty({"w": jnp.ones(2)}, state, lam=-1)


def test_memory_bytes():
  abstract = nnx.eval_shape(
      lambda: Decoder(ModelConfig.tiny("llama"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  )
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  memory = ewc_method.memory_bytes(abstract, examples_per_chunk=4)
  assert memory == ewc_method.EWCMemory(
      fisher=4 * count,
      anchor=4 * count,
      fisher_pass=4 * 2 * count + 4 * count,
      base_parameters=count,
  )
  assert memory.per_base_parameter == 8.0


def test_state_round_trips_through_an_orbax_checkpoint(setup, tmp_path):
  model, _, batches = setup
  params = nnx.state(model, nnx.Param)
  state = ewc.consolidate(ewc.init(params), params, ewc_method.fisher_diagonal(model, batches[1:]))
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
  chex.assert_trees_all_equal(ewc.EWCState(*restored), state)


def test_scanned_model_has_the_same_fisher(setup, tmp_path):
  model, _, batches = setup
  save_pretrained(model, model.config, tmp_path)
  scanned, _ = from_pretrained(tmp_path, scan_layers=True)
  plain = dict(nnx.to_flat_state(ewc_method.fisher_diagonal(model, batches)))
  stacked = dict(nnx.to_flat_state(ewc_method.fisher_diagonal(scanned, batches)))
  for i in range(model.config.num_layers):
    np.testing.assert_allclose(
        np.asarray(stacked[("layers", "mlp", "down")].get_value())[i],
        np.asarray(plain[("layers", i, "mlp", "down")].get_value()),
        rtol=1e-5,
        atol=1e-12,
    )


def test_penalty_gradient_adds_the_gradient_of_the_penalty_to_the_loss_gradient():
  """The updates ``penalty_gradient`` passes on are the gradient of task loss + ``penalty``
  (lambda/2 sum F (theta - theta*)^2 + C), checked against jax.grad of the penalized loss and
  against NumPy float64: g + lambda * F * (theta - theta*)."""
  rng = np.random.default_rng(3)
  state = ewc.init(_tree(rng))
  for _ in range(2):  # offline: the merged anchor differs from either stage's weights
    state = ewc.consolidate(state, _tree(rng), jax.tree.map(jnp.square, _tree(rng)))
  theta, weights, lam = _tree(rng), _tree(rng), 7.5

  def task_loss(params):  # any smooth loss with a non-trivial gradient
    terms = jax.tree.map(lambda p, w: jnp.sum(jnp.sin(w * p)), params, weights)
    return sum(jax.tree.leaves(terms))

  grads = jax.grad(task_loss)(theta)
  tx = ewc.penalty_gradient(lam)
  updates, out_state = jax.jit(tx.update)(grads, state, theta)
  chex.assert_trees_all_equal(out_state, state)  # the state passes through
  penalized = jax.grad(lambda p: task_loss(p) + ewc.penalty(p, state, lam=lam))(theta)
  chex.assert_trees_all_close(updates, penalized, rtol=1e-5, atol=1e-6)
  want = [
      g + lam * f * (x - a)
      for g, x, f, a in zip(_f64(grads), _f64(theta), _f64(state.fisher), _f64(state.anchor))
  ]
  for got, ref in zip(_f64(updates), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  penalty_part = [r - g for r, g in zip(want, _f64(grads))]
  assert min(np.abs(p).max() for p in penalty_part) > 1e-2  # the penalty term is not negligible
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, state)
