"""Writing models out: Hugging Face folders against transformers, GGUF files round-tripping
through our reader and transformers' ``gguf_file=``, and the tokenizer carried into GGUF."""

import dataclasses

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from test_models_gguf import TEMPLATE, permute, tiny_checkpoint

from epi_jax.data.byte_tokenizer import ByteTokenizer
from epi_jax.models import Decoder, ModelConfig, from_pretrained, load_tokenizer, save_pretrained
from epi_jax.models.gguf_writer import GGUFExportError, save_gguf, unsupported
from epi_jax.models.hf_names import HEADS_IN, TRANSPOSE, to_hf_layout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BYTES = ByteTokenizer().to_transformers()


def random_model(family: str, **overrides) -> Decoder:
  """A tiny model with every weight (norms and biases included) drawn away from its init."""
  config = ModelConfig.tiny(family, bos_token_id=257, eos_token_id=258, pad_token_id=256)
  model = Decoder(dataclasses.replace(config, **overrides), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, noisy))
  return model


def random_ids(seed: int, shape=(2, 24)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 262, shape)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.numpy()


def params(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_folder_logits_equal_transformers(family, tmp_path):
  model = random_model(family)
  save_pretrained(model, model.config, tmp_path, tokenizer=BYTES)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  assert reference.generation_config.eos_token_id == 258
  assert reference.generation_config.pad_token_id == 256
  ids = random_ids(0)  # 24 tokens: past the sliding window (8) of mistral and gemma2
  want, got = torch_logits(reference, ids), np.asarray(model(jnp.asarray(ids)))
  print(f"{family} folder: max |logit difference| {np.abs(got - want).max():.2e}")
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path)("hé")["input_ids"] == [104, 195, 169]


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("gemma2", {})],
)
def test_gguf_round_trips_through_our_reader(family, overrides, tmp_path):
  model = random_model(family, **overrides)
  ids = jnp.asarray(random_ids(1))
  for tensor_type in ("f32", "f16"):
    path = tmp_path / f"model-{tensor_type}.gguf"
    save_gguf(model, model.config, path, tokenizer=BYTES, tensor_type=tensor_type)
    back, config = from_pretrained(path)
    assert config == model.config
    want, got = params(model), params(back)
    if tensor_type == "f32" and family != "gemma2":
      chex.assert_trees_all_equal(got, want)
    else:  # gemma2 stores norms as w + 1: float32 rounding of the sum
      tol = 2.0**-11 if tensor_type == "f16" else 2.0**-23
      jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=tol, atol=tol), got, want)
    difference = np.abs(np.asarray(back(ids)) - np.asarray(model(ids))).max()
    print(
        f"{family}{overrides} {tensor_type}: ours from GGUF vs ours, max |logit diff| {difference:.2e}"
    )
    assert difference < (1e-6 if tensor_type == "f32" else 1e-2)


def test_llama_q_and_k_rows_are_stored_in_llama_cpps_order(tmp_path):
  """The stored q and k against llama.cpp's permutation (float64, the GGUF test's reference)."""
  model = random_model("llama")
  save_gguf(model, model.config, tmp_path / "m.gguf", tokenizer=BYTES, tensor_type="f32")
  stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
  layer = model.layers[1]
  for name, value, layout, heads in (
      ("blk.1.attn_q.weight", layer.attn.q[...], HEADS_IN, 4),
      ("blk.1.attn_k.weight", layer.attn.k[...], HEADS_IN, 2),
      ("blk.1.ffn_up.weight", layer.mlp.up[...], TRANSPOSE, None),
  ):
    hf = to_hf_layout(np.asarray(value, np.float64), layout)
    want = permute(hf, heads) if heads else hf
    np.testing.assert_array_equal(stored[name].reshape(hf.shape), want, err_msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_loads_in_transformers(family, tmp_path):
  model = random_model(family)
  ids = random_ids(2)
  for tensor_type in ("f32", "f16"):
    name = f"model-{tensor_type}.gguf"
    save_gguf(model, model.config, tmp_path / name, tokenizer=BYTES, tensor_type=tensor_type)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours, _ = from_pretrained(tmp_path / name)  # the same rounded weights
    want, got = torch_logits(reference, ids), np.asarray(ours(jnp.asarray(ids)))
    print(
        f"{family} {tensor_type}: transformers gguf_file= vs ours, max |logit diff| "
        f"{np.abs(got - want).max():.2e}; vs the unrounded model "
        f"{np.abs(np.asarray(model(jnp.asarray(ids))) - want).max():.2e}"
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
    assert tokenizer.chat_template == BYTES.chat_template
    chat = [{"role": "user", "content": "2 + 2 = ?"}, {"role": "assistant", "content": "4"}]
    assert (
        tokenizer.apply_chat_template(chat, return_dict=False)
        == ByteTokenizer().encode_chat(chat)[0].tolist()
    )
    text = "héllo <eos> wörld\n\t🙂"
    assert tokenizer(text)["input_ids"] == BYTES(text)["input_ids"]


def test_gguf_tokenizers_are_carried_over(tmp_path_factory, tmp_path):
  """From a GGUF source every tokenizer key is copied; a byte-level BPE transformers tokenizer
  with merges is written so that transformers reads back the same tokenizer."""
  _, _, source = tiny_checkpoint(tmp_path_factory, "llama")
  model, config = from_pretrained(source)
  save_gguf(model, config, tmp_path / "copied.gguf", tokenizer=source, tensor_type="f32")
  fields = {
      path: {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if "tokenizer" in k}
      for path in (source, tmp_path / "copied.gguf")
  }
  assert fields[source] == fields[tmp_path / "copied.gguf"] and fields[source]
  tokenizer = load_tokenizer(source)
  save_gguf(model, config, tmp_path / "built.gguf", tokenizer=tokenizer, tensor_type="f32")
  built = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="built.gguf")
  assert built.chat_template == TEMPLATE
  for text in ("the cat is at the inn", " hi\nthere  <|im_end|> é", "<|im_start|>user"):
    assert built(text)["input_ids"] == tokenizer(text)["input_ids"], text
  chex.assert_trees_all_equal(params(from_pretrained(tmp_path / "built.gguf")[0]), params(model))


def test_what_gguf_cannot_hold_is_refused_by_name(tmp_path):
  assert unsupported(ModelConfig.tiny("llama")) == []
  assert "rope scaling" in unsupported(ModelConfig.llama3_1_8b())[0]
  assert "sliding-window" in unsupported(ModelConfig.tiny("mistral"))[0]
  assert (
      "query_pre_attn_scalar=24"
      in unsupported(ModelConfig.tiny("gemma2", query_pre_attn_scalar=24))[0]
  )
  model = random_model("mistral")
  with pytest.raises(GGUFExportError, match="sliding-window"):
    save_gguf(model, model.config, tmp_path / "m.gguf", tokenizer=BYTES)
  llama = random_model("llama")
  with pytest.raises(GGUFExportError, match="'q8'"):
    save_gguf(llama, llama.config, tmp_path / "m.gguf", tokenizer=BYTES, tensor_type="q8")
  words = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(
          tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")
      )
  )
  with pytest.raises(GGUFExportError, match="only byte-level BPE.*WordLevel"):
    save_gguf(llama, llama.config, tmp_path / "m.gguf", tokenizer=words)
  assert unsupported(ModelConfig.gemma2_9b()) == []
