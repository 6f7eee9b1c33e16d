"""mask_history: full saves each refresh's mask as EPI's state packs it; unpacked it is the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import epi_jax
from epi_jax.train.checkpointing import RunCheckpoints, RunRecord
from epi_jax.train.methods.epi import host_packed_masks


def test_saved_masks_unpack_to_the_protection_mask(tmp_path):
  rng = np.random.default_rng(0)
  params = {
      "w": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32),  # packed: 16 = 2 bytes
      "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),  # 5 bits: kept as bool
      "s": jnp.asarray(0.5, jnp.float32),  # 0-d: kept as bool
      "ids": jnp.arange(3),
  }
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  tx = epi_jax.epi(optax.adamw(1e-2), p=0.3, interval=1)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  masks = {"refresh_1": host_packed_masks(state)}
  assert masks["refresh_1"]["['w']"].dtype == np.uint8
  ckpt = RunCheckpoints(str(tmp_path), keep=2)
  ckpt.save(1, {"x": jnp.zeros(2)}, RunRecord(step=1), masks)
  _, _, restored = ckpt.restore(1, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}, with_masks=True)
  ckpt.close()
  expected = jax.tree_util.tree_flatten_with_path(epi_jax.protection_mask(state))[0]
  assert sorted(restored["refresh_1"]) == sorted(jax.tree_util.keystr(p) for p, _ in expected)
  for path, mask in expected:
    saved = np.asarray(restored["refresh_1"][jax.tree_util.keystr(path)])
    unpacked = np.unpackbits(saved, axis=-1).astype(bool) if saved.dtype == np.uint8 else saved
    np.testing.assert_array_equal(unpacked, np.asarray(mask))
  assert np.asarray(epi_jax.protection_mask(state)["w"]).sum() > 0
