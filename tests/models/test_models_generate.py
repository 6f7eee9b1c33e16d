"""Sampling: the nucleus, reproducibility, argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epi_jax.models import Decoder, ModelConfig
from epi_jax.models.generate import generate, sample_token


@pytest.fixture(scope="module")
def model():
  return Decoder(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0))


def test_sample_token_stays_inside_the_nucleus():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  draws = np.asarray(sample_token(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(0.7)))
  counts = np.bincount(draws, minlength=4) / draws.size
  assert counts[2:].sum() == 0  # 0.5 + 0.3 already covers 0.7
  np.testing.assert_allclose(counts[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_tiny_top_p_is_greedy(model):
  ids = jnp.array([[0, 0, 5, 6], [7, 8, 9, 10]])
  mask = ids > 0
  greedy = generate(model, ids, mask, max_new_tokens=5, eos_token_id=())
  nucleus = generate(
      model,
      ids,
      mask,
      max_new_tokens=5,
      temperature=1.0,
      top_p=1e-6,
      eos_token_id=(),
      rng=jax.random.key(3),
  )
  np.testing.assert_array_equal(greedy, nucleus)


def test_sampling_is_reproducible_and_depends_on_the_key(model):
  ids = jnp.array([[4, 5, 6]] * 4)

  def run(seed):
    return np.asarray(
        generate(
            model, ids, max_new_tokens=8, temperature=1.5, eos_token_id=(), rng=jax.random.key(seed)
        )
    )

  np.testing.assert_array_equal(run(0), run(0))
  assert (run(0) != run(1)).any()


def test_generation_arguments_are_checked(model):
  ids = jnp.array([[4, 5]])
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, ids, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, ids, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="rng"):
    generate(model, ids, max_new_tokens=2, temperature=0.7)
