"""The fine-tuned model comes out: ``<run_dir>/model`` after training, and ``python -m
epi_jax.export`` on any checkpoint of the run (Hugging Face folder, GGUF), bad input refused."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from epi_jax import export
from epi_jax.data.byte_tokenizer import ByteTokenizer
from epi_jax.models import from_pretrained
from epi_jax.train.checkpointing import params_sha256
from epi_jax.train.export import restore_model, run_config
from epi_jax.train.loading import load_config
from epi_jax.train.loop import train
from tiny_run import tiny_config_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT = [
    {"role": "user", "content": "Rewrite: the cat sät."},
    {"role": "assistant", "content": "ok"},
]


def params(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny EPI run: two stages of 3 steps, checkpoints at steps 2, 3, 4, 6."""
  tmp = tmp_path_factory.mktemp("export")
  summary = train(load_config(tiny_config_file(tmp)), run_dir=str(tmp / "run"))
  return tmp / "run", summary


@pytest.mark.slow
def test_the_run_writes_a_model_transformers_loads(run):
  run_dir, summary = run
  final = restore_model(str(run_dir), run_config(str(run_dir)), 6)
  assert params_sha256(nnx.state(final, nnx.Param)) == summary["params_sha256"]
  model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
  ids, _ = ByteTokenizer().encode_chat(CHAT)
  assert tokenizer.apply_chat_template(CHAT, return_dict=False) == ids.tolist()
  with torch.no_grad():
    want = model(torch.as_tensor(ids[None], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(final(jnp.asarray(ids[None]))), want, atol=1e-5, rtol=0)
  # The byte tokenizer's special ids, not the tiny preset's, so generate stops at <eos>.
  assert (model.config.eos_token_id, model.generation_config.eos_token_id) == (258, 258)
  assert model.config.pad_token_id == 256 and model.config.bos_token_id == 257


@pytest.mark.slow
def test_export_cli_writes_any_stage_as_folder_and_gguf(run, tmp_path):
  run_dir, _ = run
  done = subprocess.run(
      [sys.executable, "-m", "epi_jax.export", str(run_dir), "--stage", "0", "--gguf"],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = run_dir / "exports" / "step_3"  # stage 0 ends at step 3
  assert done.stdout.strip().splitlines()[-1] == str(out)
  stage0 = restore_model(str(run_dir), run_config(str(run_dir)), 3)
  folder, _ = from_pretrained(out)
  chex.assert_trees_all_equal(params(folder), params(stage0))
  from_gguf, _ = from_pretrained(out / "model-f16.gguf")
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g, w, rtol=2.0**-11, atol=2.0**-14),
      params(from_gguf),
      params(stage0),
  )
  assert json.loads((out / "config.json").read_text())["eos_token_id"] == 258

  # The last stage, F32: the same tensors as <run_dir>/model, the GGUF bit for bit.
  assert (
      export.main(
          [str(run_dir), "--stage", "1", "--gguf", "--gguf-type", "f32", "--out", str(tmp_path)]
      )
      == 0
  )
  chex.assert_trees_all_equal(
      load_file(tmp_path / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
  )
  chex.assert_trees_all_equal(
      params(from_pretrained(tmp_path / "model-f32.gguf")[0]), params(from_pretrained(tmp_path)[0])
  )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/absent"], "{tmp}/absent: not a run directory (no config.yaml)"),
        (["{run}", "--step", "5"], "{run}/checkpoints: no checkpoint at step 5 (kept: 2, 3, 4, 6)"),
        (["{run}", "--stage", "2"], "{run}/checkpoints: no checkpoint at the end of stage 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, args, message):
  run_dir, _ = run
  fill = lambda text: text.format(tmp=tmp_path, run=run_dir)
  assert export.main([fill(a) for a in args]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1
  assert err.startswith("error: " + fill(message))
