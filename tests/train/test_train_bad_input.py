"""Bad input through the trainer's command line: one ``error:`` line naming the file and the
problem, exit code 2, no traceback, and an earlier run's outputs untouched.

The table runs in-process through ``cli.main`` (every error comes before any compile); two
cases run ``python train.py`` as a user would.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from epi_jax.models import Decoder, ModelConfig, save_pretrained
from epi_jax.train import cli
from epi_jax.train.checkpointing import RunCheckpoints, RunRecord
from tiny_run import tiny_config_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "data"))
from data_tokenizers import CHATML, byte_level_tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
EARLIER = {"metrics.jsonl": '{"kind": "train", "step": 1}\n', "summary.json": "{}\n"}
"""Files of an earlier run in the run directory: no refused command may touch them."""


def gsm8k_lines(n: int) -> str:
  return "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(n))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A tiny llama Hugging Face folder with a chat-template tokenizer."""
  path = tmp_path_factory.mktemp("hf") / "tiny"
  config = ModelConfig.tiny("llama")
  save_pretrained(
      Decoder(config, rngs=nnx.Rngs(0)), config, path, tokenizer=byte_level_tokenizer(CHATML)
  )
  return path


def broken_folder(hf_folder, tmp_path, change):
  """A copy of ``hf_folder`` after ``change(folder)``."""
  folder = tmp_path / "broken"
  shutil.copytree(hf_folder, folder)
  change(folder)
  return folder


def edit_config(folder, **fields):
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(config | fields))


def cut_gguf(tmp_path):
  """A valid GGUF file cut in the middle of its tensor data."""
  path = tmp_path / "model.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  path.write_bytes(path.read_bytes()[:-200])
  return path


def hf_data(checkpoint, file):
  """Overrides of a run of gsm8k from ``file`` on ``checkpoint``."""
  return [
      "data.source=hf",
      f"model.checkpoint={checkpoint}",
      "data.tasks=[gsm8k]",
      f"data.files={{gsm8k: {file}}}",
      "data.n_train=2",
      "data.n_eval=1",
      "method.stages=[]",
  ]


def data_file(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return path


def parquet_without_answer(tmp_path):
  path = tmp_path / "gsm8k.parquet"
  pq.write_table(pa.table({"question": ["q0", "q1", "q2"]}), path)
  return path


def empty_checkpoints(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir()
  return [], ["--resume"]


def garbled_record(tmp_path):
  """A complete checkpoint 3 whose record (the ``meta`` item) is not JSON."""
  checkpoints = RunCheckpoints(str(tmp_path / "run"), keep=1)
  checkpoints.save(3, {"x": np.zeros(2, np.float32)}, RunRecord(step=3), None)
  checkpoints.close()
  (tmp_path / "run" / "checkpoints" / "3" / "meta" / "metadata").write_text("{step")
  return [], ["--resume"]


# (id, setup(tmp_path, hf_folder) -> (overrides, extra arguments), message with {placeholders}
# filled from the setup's locals: the exact line after "error: ").
CASES = [
    (
        "gsm8k record without answer",
        lambda t, hf: hf_data(hf, data_file(t, "g.jsonl", '{"question": "q"}\n')),
        "{t}/g.jsonl:1: missing field 'answer'",
    ),
    (
        "empty data file",
        lambda t, hf: hf_data(hf, data_file(t, "g.jsonl", "")),
        "{t}/g.jsonl: no records",
    ),
    (
        "JSON Lines cut off in line 2",
        lambda t, hf: hf_data(hf, data_file(t, "g.jsonl", gsm8k_lines(2)[:-20])),
        "{t}/g.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes",
    ),
    (
        "too few records to evaluate",
        lambda t, hf: hf_data(hf, data_file(t, "g.jsonl", gsm8k_lines(2))),
        "{t}/g.jsonl: 2 records leave none to evaluate: the held-out rows follow "
        "data.skip=0 and data.n_train=2",
    ),
    (
        "parquet file without the answer column",
        lambda t, hf: hf_data(hf, parquet_without_answer(t)),
        "{t}/gsm8k.parquet row 0: missing field 'answer'",
    ),
    (
        "GGUF file cut short",
        lambda t, hf: [f"model.checkpoint={cut_gguf(t)}"],
        "{t}/model.gguf: not a complete GGUF file (cannot reshape array of size 78 into shape "
        "(16,8))",
    ),
    (
        "config.json is {}",
        lambda t, hf: [
            f"model.checkpoint={broken_folder(hf, t, lambda f: (f / 'config.json').write_text('{}'))}"
        ],
        "{t}/broken/config.json: model_type=None is not supported; expected one of ('llama', "
        "'mistral', 'qwen2', 'gemma2')",
    ),
    (
        "config.json with a string hidden_size",
        lambda t, hf: [
            f"model.checkpoint={broken_folder(hf, t, lambda f: edit_config(f, hidden_size='64'))}"
        ],
        "{t}/broken/config.json: field 'hidden_size' must be a positive integer, got '64'",
    ),
    (
        "checkpoint path that does not exist",
        lambda t, hf: [f"model.checkpoint={t}/nowhere"],
        "checkpoint '{t}/nowhere' is neither a Hugging Face folder, a .gguf file nor an alias "
        "(known aliases: ['smollm2-135m-instruct'])",
    ),
    (
        "safetensors file cut short",
        lambda t, hf: [
            "model.checkpoint="
            + str(broken_folder(hf, t, lambda f: os.truncate(f / "model.safetensors", 5000)))
        ],
        "{t}/broken/model.safetensors: not a readable safetensors file: Error while "
        "deserializing header: incomplete metadata, file not fully covered",
    ),
    (
        "folder without safetensors",
        lambda t, hf: [
            "model.checkpoint="
            + str(broken_folder(hf, t, lambda f: os.remove(f / "model.safetensors")))
        ],
        "{t}/broken: no *.safetensors files",
    ),
    (
        "tensor shapes that do not match config.json",
        lambda t, hf: [
            "model.checkpoint="
            + str(broken_folder(hf, t, lambda f: edit_config(f, intermediate_size=96)))
        ],
        "checkpoint {t}/broken does not match the model: wrong shape (6): "
        "model.layers.0.mlp.down_proj.weight: shape (64, 128), expected (64, 96); "
        "model.layers.0.mlp.gate_proj.weight: shape (128, 64), expected (96, 64); "
        "model.layers.0.mlp.up_proj.weight: shape (128, 64), expected (96, 64); "
        "model.layers.1.mlp.down_proj.weight: shape (64, 128), expected (64, 96); "
        "model.layers.1.mlp.gate_proj.weight: shape (128, 64), expected (96, 64); "
        "model.layers.1.mlp.up_proj.weight: shape (128, 64), expected (96, 64)",
    ),
    (
        "tokenizer.json that is not JSON",
        lambda t, hf: hf_data(
            broken_folder(hf, t, lambda f: (f / "tokenizer.json").write_text("{tokens")),
            data_file(t, "g.jsonl", gsm8k_lines(3)),
        ),
        "{t}/broken/tokenizer.json:1: invalid JSON: Expecting property name enclosed in double "
        "quotes",
    ),
    (
        "data.source=hf on a checkpoint without tokenizer",
        lambda t, hf: hf_data(
            broken_folder(hf, t, lambda f: [os.remove(f / n) for n in os.listdir(f) if "tok" in n]),
            data_file(t, "g.jsonl", gsm8k_lines(3)),
        ),
        "{t}/broken: no tokenizer files (tokenizer.json, tokenizer_config.json or "
        "tokenizer.model); data.source=hf encodes the chats with them",
    ),
    (
        "data.source=hf without a checkpoint",
        lambda t, hf: hf_data("''", data_file(t, "g.jsonl", gsm8k_lines(3))),
        "model.checkpoint: data.source=hf needs a checkpoint (its tokenizer)",
    ),
    (
        "wrong-type config value",
        lambda t, hf: ["optim.lr=fast"],
        "{config}: invalid config: optim.lr: must be float, got str 'fast'",
    ),
    (
        "unknown task name",
        lambda t, hf: ["data.tasks=[rewrite, riddles]"],
        "{config}: invalid config: data.tasks: unknown task 'riddles' for data.source=synthetic; "
        "known: arithmetic, string_code, logic_choice, rewrite, dialogue, code_more, logic_chain, "
        "dialogue_more",
    ),
    (
        "data file for an unknown task",
        lambda t, hf: hf_data(hf, data_file(t, "g.jsonl", gsm8k_lines(3)))
        + [f"data.files.gsm9k={t}/g.jsonl"],
        "{config}: invalid config: data.files: unknown task gsm9k; known: gsm8k, code_alpaca, "
        "logiqa, alpaca, ultrachat",
    ),
    (
        "judge model without a URL",
        lambda t, hf: ["eval.judge.model=gpt-judge"],
        "{config}: invalid config: eval.judge.model: set, but eval.judge.url is empty (no judge)",
    ),
    (
        "judge URL without scheme and model",
        lambda t, hf: ["eval.judge.url=localhost:8000/v1"],
        "{config}: invalid config: eval.judge.url: must start with http:// or https://, got "
        "'localhost:8000/v1'; eval.judge.model: needed with eval.judge.url",
    ),
    (
        "--resume of a directory that does not exist",
        lambda t, hf: ([], ["--resume", "--run-dir", f"{t}/no_run"]),
        "--resume: {t}/no_run/checkpoints: no such directory, nothing to resume",
    ),
    (
        "--resume of a directory without a checkpoint",
        lambda t, hf: ([], ["--resume"]),
        "--resume: {run}/checkpoints: no such directory, nothing to resume",
    ),
    (
        "--resume of a directory with an empty checkpoints folder",
        lambda t, hf: empty_checkpoints(t),
        "--resume: no complete checkpoint in {run}/checkpoints",
    ),
    (
        "--resume of a checkpoint whose record is not JSON",
        lambda t, hf: garbled_record(t),
        "--resume: {run}/checkpoints/3: unreadable: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)",
    ),
]


@pytest.mark.parametrize("setup, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(setup, expected, hf_folder, tmp_path, capsys):
  config = tiny_config_file(tmp_path)
  run = tmp_path / "run"
  run.mkdir()
  for name, text in EARLIER.items():
    (run / name).write_text(text)
  overrides = setup(tmp_path, hf_folder)
  overrides, extra = overrides if isinstance(overrides, tuple) else (overrides, [])
  sets = [x for o in overrides for x in ("--set", o)]
  before = sorted(os.walk(run))
  code = cli.main(["--config", config, "--run-dir", str(run), *sets, *extra])
  err = capsys.readouterr().err
  assert code == 2
  assert err == "error: " + expected.format(t=tmp_path, config=config, run=run) + "\n"
  assert {name: (run / name).read_text() for name in EARLIER} == EARLIER
  assert sorted(os.walk(run)) == before


CODE_ALPACA = json.dumps({"instruction": "Add.", "input": "", "output": "x + y"}) + "\n"
MISSING = [
    (
        "datasets",
        "gsm8k",
        gsm8k_lines(3),
        "loading the dataset 'gsm8k' (data.source: hf) needs the data extra (no module "
        "datasets): pip install 'epi-jax[data]'",
    ),
    (
        "codebleu",
        "code_alpaca",
        CODE_ALPACA * 3,
        "the codebleu metric needs the eval extra (no module codebleu): pip install 'epi-jax[eval]'",
    ),
]


@pytest.mark.parametrize("module, task, records, expected", MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_extra_is_one_line_and_exit_2(
    module, task, records, expected, hf_folder, tmp_path, capsys, monkeypatch
):
  """A run whose data or metric needs an extra that is not installed stops before any work."""
  monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
  file = data_file(tmp_path, f"{task}.jsonl", records)
  sets = [f"model.checkpoint={hf_folder}", f"data.tasks=[{task}]", f"data.files={{{task}: {file}}}"]
  sets += ["data.source=hf", "data.n_train=2", "data.n_eval=1", "method.stages=[]"]
  run = tmp_path / "run"
  argv = ["--config", tiny_config_file(tmp_path), "--run-dir", str(run)]
  assert cli.main(argv + [x for o in sets for x in ("--set", o)]) == 2
  assert capsys.readouterr().err == f"error: {expected}\n"
  assert not run.exists()


def train_py(args, tmp_path, **env):
  return subprocess.run(
      [sys.executable, "train.py", "--config", tiny_config_file(tmp_path), *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"} | env,
      timeout=300,
  )


def test_train_py_refuses_a_record_without_answer_in_one_line(hf_folder, tmp_path):
  data = data_file(tmp_path, "g.jsonl", gsm8k_lines(3) + '{"question": "q"}\n')
  run = tmp_path / "run"
  run.mkdir()
  (run / "summary.json").write_text("{}")
  sets = [x for o in hf_data(hf_folder, data) for x in ("--set", o)]
  out = train_py([*sets, "--run-dir", str(run)], tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr == f"error: {data}:4: missing field 'answer'\n"
  assert (run / "summary.json").read_text() == "{}"


def test_train_py_refuses_an_unknown_hub_dataset_in_one_line(hf_folder, tmp_path):
  sets = [x for o in hf_data(hf_folder, "no-such-user/no-such-data") for x in ("--set", o)]
  run = ["--run-dir", str(tmp_path / "run")]
  out = train_py([*sets, *run], tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  assert out.returncode == 2, out.stderr[-2000:]
  line = "error: no-such-user/no-such-data[train]: cannot load from the Hugging Face hub: "
  assert out.stderr.startswith(line) and out.stderr.count("\n") == 1, out.stderr
  assert "Traceback" not in out.stderr
