"""Option log-likelihoods (LogiQA) against a NumPy float64 reference, and bucketed generation
against one-prompt-at-a-time generation, on a tiny random decoder."""

import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

import epi_jax.data as data
from epi_jax.eval import METRICS, evaluate
from epi_jax.eval import generation
from epi_jax.eval.generation import (
    _batches,
    batch_rows,
    bucket,
    generate_texts,
    option_loglikelihoods,
    scoring_rows,
)
from epi_jax.models import Decoder, ModelConfig
from epi_jax.models.generate import _generate, generate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "data"))
from data_tokenizers import CHATML, byte_level_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model():
  return Decoder(
      ModelConfig.tiny("llama", vocab_size=data.byte_tokenizer.VOCAB_SIZE), rngs=nnx.Rngs(0)
  )


def logiqa_examples(seed, n):
  rng = np.random.default_rng(seed)
  words = ["all", "some", "cats", "purr", "the", "if", "then", "Tom", "is", "not", "a", "dog"]
  out = []
  for _ in range(n):
    passage = " ".join(rng.choice(words, size=rng.integers(3, 40)))
    options = tuple(" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(4))
    answer = int(rng.integers(4))
    turns = [
        {"role": "user", "content": f"Passage: {passage}\nQuestion: which?\nAnswer:"},
        {"role": "assistant", "content": options[answer]},
    ]
    out.append(data.EvalExample(turns, options, answer))
  return out


@nnx.jit
def forward(model, ids):
  return model(ids)


def reference_loglikelihood(model, prompt, completion):
  """Sum of log p(completion tokens) from one unpadded row, log-softmax in float64."""
  row = np.concatenate([prompt, completion]).astype(np.int32)
  logits = np.asarray(forward(model, row[None]), np.float64)[0, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  targets = row[1:]
  return sum(logp[t, targets[t]] for t in range(len(prompt) - 1, len(row) - 1))


def lm_eval_split(tokenizer, context, continuation):
  """lm-evaluation-harness ``_encode_pair``, written out for the reference."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
  prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
  return np.asarray(prompt), np.asarray(whole[len(prompt) :])


@pytest.mark.parametrize("scoring_length", [generation.SCORING_LENGTH, 16])
@pytest.mark.parametrize("encoder_kind", ["bytes", "chat_template"])
def test_option_loglikelihoods_match_float64_reference(
    model, encoder_kind, scoring_length, monkeypatch
):
  """Scored in full batches, and (scoring length 16) long rows one per call."""
  monkeypatch.setattr(generation, "SCORING_LENGTH", scoring_length)
  if encoder_kind == "bytes":
    encoder = data.ByteTokenizer()
  else:
    encoder = data.ChatTemplateEncoder(byte_level_tokenizer(CHATML))
  examples = logiqa_examples(1, 4)
  got = option_loglikelihoods(model, encoder, examples, batch_size=3)
  lengths = []
  for example, values in zip(examples, got):
    expected = []
    for option in example.choices:
      if encoder_kind == "bytes":
        prompt, completion = encoder.encode_prompt(example.prompt), np.asarray(
            encoder.encode(option)
        )
      else:
        context = encoder.tokenizer.apply_chat_template(
            example.prompt, tokenize=False, add_generation_prompt=True
        )
        assert context.endswith("\n")  # the newline moves into the continuation
        prompt, completion = lm_eval_split(encoder.tokenizer, context, option)
      lengths.append(len(prompt) + len(completion))
      expected.append(reference_loglikelihood(model, prompt, completion))
    assert values.dtype == np.float64 and values.shape == (4,)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=2e-3)
  assert len({bucket(n) for n in lengths}) >= 2  # rows of several buckets were scored

  scores = METRICS["multiple_choice"].score(examples, got, None)
  acc = np.mean([np.argmax(v) == e.answer for e, v in zip(examples, got)])
  norm = np.mean(
      [
          np.argmax(v / np.array([len(c) for c in e.choices])) == e.answer
          for e, v in zip(examples, got)
      ]
  )
  assert scores == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(norm)}


def test_bucketed_generation_equals_one_prompt_at_a_time(model):
  encoder = data.ByteTokenizer()
  chats = [
      c
      for t in ("string_code", "arithmetic")  # short and long prompts
      for c in data.task_splits(t, seed=0, n_train=0, n_eval=2)[1]
  ]
  prompts = [encoder.encode_prompt(chat[:-1]) for chat in chats]
  assert len({bucket(len(p)) for p in prompts}) >= 2
  texts = generate_texts(model, encoder, prompts, max_new_tokens=6, batch_size=3)
  for prompt, text in zip(prompts, texts):
    alone = np.asarray(
        generate(
            model,
            prompt[None],
            max_new_tokens=6,
            eos_token_id=encoder.eos_id,
            pad_token_id=encoder.pad_id,
        )
    )[0]
    stop = np.flatnonzero(alone == encoder.eos_id)
    assert text == encoder.decode(alone[: stop[0]] if stop.size else alone)


def test_evaluate_dispatches_by_metric_and_compiles_once_per_bucket(model):
  encoder = data.ByteTokenizer()
  examples = {
      t: [data.EvalExample(c) for c in data.task_splits(t, seed=0, n_train=0, n_eval=4)[1]]
      for t in ("arithmetic", "dialogue")
  }
  examples["logiqa"] = logiqa_examples(2, 3)
  metrics = {"arithmetic": "exact_match", "dialogue": "judge", "logiqa": "multiple_choice"}
  before = _generate._cache_size()
  results = evaluate(model, encoder, examples, metrics, max_new_tokens=4, batch_size=8)
  compiled = _generate._cache_size() - before
  prompts = [
      encoder.encode_prompt(e.prompt) for t in ("arithmetic", "dialogue") for e in examples[t]
  ]
  lengths = [len(p) for p in prompts]
  batches = _batches(lengths, lambda _: 8)
  shapes = {(length, batch_rows(len(index), 8)) for length, index in batches}
  assert compiled == len(shapes) and len(shapes) < len(prompts)
  other = Decoder(
      ModelConfig.tiny("llama", vocab_size=data.byte_tokenizer.VOCAB_SIZE), rngs=nnx.Rngs(1)
  )
  evaluate(other, encoder, examples, metrics, max_new_tokens=4, batch_size=8)
  assert _generate._cache_size() - before == compiled  # a later stage compiles nothing new
  assert set(results["arithmetic"]) == {"exact_match", "n"}
  assert set(results["dialogue"]) == {"rougeL_proxy", "n"}
  assert set(results["logiqa"]) == {"acc", "acc_norm", "n"} and results["logiqa"]["n"] == 3
  with pytest.raises(ValueError, match="tasks without a known metric: {'arithmetic': 'bleu'}"):
    evaluate(
        model, encoder, examples, metrics | {"arithmetic": "bleu"}, max_new_tokens=4, batch_size=8
    )


def test_long_scoring_rows_go_fewer_to_a_call():
  """rows x length**2 stays within batch_size x SCORING_LENGTH**2 (at least one row)."""
  n = generation.SCORING_LENGTH
  assert [scoring_rows(length, 16) for length in (n // 2, n, 2 * n, 4 * n, 8 * n)] == [
      16,
      16,
      4,
      1,
      1,
  ]
  lengths = [30, 31, 40, 70, 71, 72, 200]  # buckets 32, 64, 128, 256
  cap = lambda length: {32: 3, 64: 2, 128: 2, 256: 1}[length]
  got = [(length, sorted(index)) for length, index in _batches(lengths, cap)]
  assert got == [(32, [0, 1]), (64, [2]), (128, [3, 4]), (128, [5]), (256, [6])]
