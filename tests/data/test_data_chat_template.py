"""Chat-template rendering and the response mask."""

import numpy as np
import pytest

from epi_jax.data.chat_template import ChatTemplateEncoder
from data_tokenizers import CHATML, byte_level_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name the color of the sky."},
    {"role": "assistant", "content": "the sky is blue"},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "green, ünïcode"},
]


def masked_runs(encoder, ids, mask):
  """Decoded text of each maximal run of masked tokens."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return [encoder.tokenizer.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def test_mask_covers_exactly_each_response_and_its_end_marker():
  encoder = ChatTemplateEncoder(byte_level_tokenizer(CHATML))
  ids, mask = encoder.encode_chat(CHAT)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
  assert masked_runs(encoder, ids, mask) == [
      "the sky is blue<|im_end|>\n",
      "green, ünïcode<|im_end|>\n",
  ]
  prompt = encoder.encode_prompt(CHAT[:4])
  np.testing.assert_array_equal(prompt, ids[: len(prompt)])
  assert mask[len(prompt)] and not mask[len(prompt) - 1]
  assert encoder.decode(ids[mask]).startswith("the sky is blue")


def test_fallback_template_without_chat_template():
  plain_tokenizer = byte_level_tokenizer(None)
  encoder = ChatTemplateEncoder(plain_tokenizer)
  ids, mask = encoder.encode_chat(CHAT[1:3])
  text = plain_tokenizer.decode(ids)
  assert text == "<s><|user|>\nName the color of the sky.\n<|assistant|>\nthe sky is blue</s>\n"
  assert masked_runs(encoder, ids, mask) == ["the sky is blue</s>\n"]
  assert encoder.pad_id == plain_tokenizer.pad_token_id


def test_template_that_rewrites_earlier_turns_is_refused():
  # Shows only the last message's content in full: earlier turns change once more follow.
  template = (
      "{% for m in messages %}{{ m['role'] }}:"
      "{% if loop.last %}{{ m['content'] }}{% else %}...{% endif %}\n{% endfor %}"
  )
  encoder = ChatTemplateEncoder(byte_level_tokenizer(template))
  with pytest.raises(ValueError, match="turn 2 differently"):
    encoder.encode_chat(CHAT[:4])


def test_bad_turns_are_refused():
  with pytest.raises(ValueError, match="role"):
    ChatTemplateEncoder(byte_level_tokenizer(CHATML)).encode_chat(
        [{"role": "robot", "content": "hi"}]
    )
