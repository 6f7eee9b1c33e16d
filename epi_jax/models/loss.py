"""Log-probabilities of target tokens from a decoder's hidden states, with the logits made in
chunks of tokens so that no [tokens, vocab] array exists whole."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Logits of at most this many bytes at a time: over a 49k vocabulary, [B * T, V] float32 logits
# and their gradient would otherwise be a step's largest buffers (about 0.8 GB at 4 x 512).
LOGIT_CHUNK_BYTES = 128 * 2**20


def target_log_probs(model, hidden: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) [...] under ``model.logits(hidden)``, for hidden [..., D], targets [...]
  (``model``: anything with the Decoder's ``logits``).

  The logits are made and consumed in chunks of tokens (``LOGIT_CHUNK_BYTES``), each
  rematerialized in the backward pass; inputs whose logits fit one chunk take one plain pass.
  """
  shape = targets.shape
  x, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)

  def log_probs(x, t):
    return -optax.softmax_cross_entropy_with_integer_labels(model.logits(x), t)

  n = t.shape[0]
  vocab = model.logits(x[:1]).shape[-1]  # traced for its shape only: dead code to XLA
  chunk = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
  if n <= chunk:
    return log_probs(x, t).reshape(shape)
  pad = -n % chunk  # padded tokens are cut off again below
  x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1])
  t = jnp.pad(t, (0, pad)).reshape(-1, chunk)
  _, out = jax.lax.scan(jax.checkpoint(lambda c, xs: (c, log_probs(*xs))), None, (x, t))
  return out.reshape(-1)[:n].reshape(shape)
