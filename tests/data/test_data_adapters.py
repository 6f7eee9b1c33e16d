"""Dataset adapters on small local files in each dataset's Hugging Face schema."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from epi_jax.data.adapters import DATASET_METRICS, DATASET_NAMES, load_chats, load_examples
from epi_jax.data.records import DataError
from shared_data import SHARED_DATA

RECORDS = {
    "gsm8k": {
        "question": "Ann has 3 pens and buys 2. How many?",
        "answer": "3+2=<<3+2=5>>5\n#### 5",
    },
    "code_alpaca": {
        "instruction": "Reverse a list in Python.",
        "input": "xs = [1, 2]",
        "output": "xs[::-1]",
    },
    "logiqa": {
        "context": "All cats purr. Tom is a cat.",
        "query": "Which follows?",
        "options": ["Tom barks", "Tom purrs", "Tom flies", "None"],
        "correct_option": 1,
    },
    "alpaca": {
        "instruction": "Name a color.",
        "input": "",
        "output": "Blue.",
        "text": "Below is an instruction...\n### Response:\nBlue.",
    },
    "ultrachat": {
        "prompt": "Hi!",
        "prompt_id": "00ab",
        "messages": [
            {"content": "Hi!", "role": "user"},
            {"content": "Hello.", "role": "assistant"},
            {"content": "Bye.", "role": "user"},
            {"content": "Goodbye.", "role": "assistant"},
        ],
    },
}
EXPECTED = {
    "gsm8k": [
        {"role": "user", "content": "Ann has 3 pens and buys 2. How many?"},
        {"role": "assistant", "content": "3+2=<<3+2=5>>5\n#### 5"},
    ],
    "code_alpaca": [
        {"role": "user", "content": "Reverse a list in Python.\n\nxs = [1, 2]"},
        {"role": "assistant", "content": "xs[::-1]"},
    ],
    "logiqa": [
        {
            "role": "user",
            "content": (
                "Passage: All cats purr. Tom is a cat.\n"
                "Question: Which follows?\nChoices:\nA. Tom barks\nB. Tom purrs\nC. Tom flies\n"
                "D. None\nAnswer:"
            ),
        },
        {"role": "assistant", "content": "Tom purrs"},
    ],
    "alpaca": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ],
    "ultrachat": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Goodbye."},
    ],
}


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
  return path


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_jsonl_records_map_to_turns(name, tmp_path):
  path = write_jsonl(tmp_path / f"{name}.jsonl", [RECORDS[name]] * 3)
  chats = load_chats(name, path, cache_dir=str(tmp_path / "cache"))
  assert chats == [EXPECTED[name]] * 3


def test_examples_carry_what_the_metric_needs(tmp_path):
  path = write_jsonl(tmp_path / "logiqa.jsonl", [RECORDS["logiqa"]])
  [example] = load_examples("logiqa", path, system="Be brief.", cache_dir=str(tmp_path / "cache"))
  assert example.choices == ("Tom barks", "Tom purrs", "Tom flies", "None")
  assert example.answer == 1 and example.reference == "Tom purrs"
  assert example.prompt == [{"role": "system", "content": "Be brief."}, EXPECTED["logiqa"][0]]
  path = write_jsonl(tmp_path / "gsm8k.jsonl", [RECORDS["gsm8k"]])
  [example] = load_examples("gsm8k", path, cache_dir=str(tmp_path / "cache"))
  assert (example.choices, example.answer, example.reference) == ((), -1, "3+2=<<3+2=5>>5\n#### 5")
  assert DATASET_METRICS == {
      "gsm8k": "gsm8k",
      "code_alpaca": "codebleu",
      "logiqa": "multiple_choice",
      "alpaca": "judge",
      "ultrachat": "judge",
  }


def test_parquet_and_json_array_and_system_turn(tmp_path):
  parquet = tmp_path / "logiqa.parquet"
  pq.write_table(pa.Table.from_pylist([RECORDS["logiqa"]] * 2), parquet)
  assert (
      load_chats("logiqa", parquet, cache_dir=str(tmp_path / "cache")) == [EXPECTED["logiqa"]] * 2
  )
  array = tmp_path / "alpaca.json"
  array.write_text(json.dumps([RECORDS["alpaca"]] * 2, indent=2), encoding="utf-8")
  chats = load_chats("alpaca", array, system="Be kind.", cache_dir=str(tmp_path / "cache"))
  assert chats == [[{"role": "system", "content": "Be kind."}, *EXPECTED["alpaca"]]] * 2


@pytest.mark.parametrize(
    "name, bad_line, message",
    [
        ("gsm8k", '{"question": "q"}', "line_no: missing field 'answer'"),
        ("gsm8k", '{"question": "q", "answer": 5}', "line_no: field 'answer' must be a string"),
        ("alpaca", '{"instruction": "i", "input": "", "output": "o"', "line_no: invalid JSON"),
        ("alpaca", '["instruction", "input"]', "line_no: a record must be a JSON object"),
        (
            "logiqa",
            '{"context": "c", "query": "q", "options": ["a", "b"], "correct_option": 2}',
            "line_no: field 'correct_option' must be an int in \\[0, 2\\)",
        ),
        (
            "logiqa",
            '{"context": "c", "query": "q", "options": "ab", "correct_option": 0}',
            "line_no: field 'options' must be a list",
        ),
        (
            "ultrachat",
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "line_no: .*no assistant turn",
        ),
        (
            "ultrachat",
            '{"messages": [{"role": "bot", "content": "hi"}]}',
            "line_no: messages\\[0\\] must have a role",
        ),
    ],
)
def test_malformed_record_names_file_and_line(name, bad_line, message, tmp_path):
  good = json.dumps(RECORDS[name])
  path = tmp_path / "data.jsonl"
  path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
  with pytest.raises(DataError, match=message.replace("line_no", f"{path}:4")):
    load_chats(name, path, cache_dir=str(tmp_path / "cache"))


def test_unicode_line_separators_inside_a_record_do_not_split_it(tmp_path):
  record = {"question": "Balls.\u2028 How many?\u0085", "answer": "#### 3"}
  path = tmp_path / "gsm8k.jsonl"
  path.write_text(
      json.dumps(record, ensure_ascii=False) + "\n" + '{"question": "q"}\n', encoding="utf-8"
  )
  with pytest.raises(DataError, match=f"{path}:2: missing field 'answer'"):
    load_chats("gsm8k", path, cache_dir=str(tmp_path / "cache"))


def test_malformed_json_array_and_parquet_rows_are_located(tmp_path):
  array = tmp_path / "gsm8k.json"
  array.write_text(
      '[\n  {"question": "q", "answer": "a"},\n  {"question": "q"}\n]', encoding="utf-8"
  )
  with pytest.raises(DataError, match=f"{array}:3: missing field 'answer'"):
    load_chats("gsm8k", array, cache_dir=str(tmp_path / "cache"))
  parquet = tmp_path / "gsm8k.parquet"
  pq.write_table(
      pa.Table.from_pylist([{"question": "q", "answer": "a"}, {"question": "q", "answer": None}]),
      parquet,
  )
  with pytest.raises(DataError, match=f"{parquet} row 1: missing field 'answer'"):
    load_chats("gsm8k", parquet, cache_dir=str(tmp_path / "cache"))


def test_bad_names_and_paths(tmp_path):
  with pytest.raises(DataError, match="unknown dataset 'mmlu'; known datasets: gsm8k"):
    load_chats("mmlu", tmp_path / "x.jsonl")
  with pytest.raises(DataError, match="x.jsonl: no such file"):
    load_chats("gsm8k", tmp_path / "x.jsonl")
  with pytest.raises(DataError, match="not a file"):
    load_chats("gsm8k", tmp_path)
  (tmp_path / "x.parquet").write_text("not parquet\n")
  with pytest.raises(DataError, match="x.parquet: cannot load: .*magic bytes"):
    load_chats("gsm8k", tmp_path / "x.parquet", cache_dir=str(tmp_path / "cache"))
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(DataError, match="unsupported file type"):
    load_chats("gsm8k", tmp_path / "x.csv")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real samples live in ../shared/data")
@pytest.mark.parametrize("name", DATASET_NAMES)
def test_real_samples(name, tmp_path):
  chats = load_chats(name, SHARED_DATA / name / "sample.jsonl", cache_dir=str(tmp_path))
  assert chats and all(chat[-1]["role"] == "assistant" for chat in chats)
