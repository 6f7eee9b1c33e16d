"""The byte tokenizer as a transformers tokenizer: the same ids as ``ByteTokenizer``, through
``AutoTokenizer`` after saving, chat template included."""

import numpy as np
import transformers

from epi_jax.data.byte_tokenizer import CHAT_TEMPLATE, VOCAB_SIZE, ByteTokenizer

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Wie heißt die Farbe des Himmels?\n\t(ünïcödé, 🙂)"},
    {"role": "assistant", "content": "blau 🙂 "},
    {"role": "user", "content": "  and grass?"},
]


def _random_text(rng, n: int) -> str:
  """``n`` random code points from ASCII to astral planes (spaces, newlines, accents, emoji)."""
  ranges = [(9, 11), (32, 127), (160, 1024), (0x4E00, 0x4F00), (0x1F600, 0x1F650)]
  picks = [rng.integers(*ranges[rng.integers(len(ranges))]) for _ in range(n)]
  return "".join(map(chr, picks))


def test_transformers_tokenizer_encodes_the_same_ids(tmp_path):
  ours = ByteTokenizer()
  ours.to_transformers().save_pretrained(tmp_path)
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert len(loaded) == VOCAB_SIZE and loaded.chat_template == CHAT_TEMPLATE
  assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
      ours.pad_id,
      ours.bos_id,
      ours.eos_id,
  )
  rng = np.random.default_rng(0)
  for text in [_random_text(rng, int(n)) for n in rng.integers(1, 60, 20)]:
    assert loaded(text)["input_ids"] == ours.encode(text), text
    assert loaded.decode(ours.encode(text)) == text
  ids, _ = ours.encode_chat(CHAT[:3])
  rendered = loaded.apply_chat_template(CHAT[:3], tokenize=True, return_dict=False)
  assert list(rendered) == ids.tolist()
  prompt = loaded.apply_chat_template(
      CHAT, tokenize=True, add_generation_prompt=True, return_dict=False
  )
  assert list(prompt) == ours.encode_prompt(CHAT).tolist()
  assert loaded.decode(ids, skip_special_tokens=True) == ours.decode(ids)
