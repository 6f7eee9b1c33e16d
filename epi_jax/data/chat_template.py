"""Render chats with a Hugging Face tokenizer's chat template, masking the response tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from epi_jax.data.turns import Turn, check_turns

FALLBACK_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Used when the tokenizer has no ``chat_template``: ``<|role|>`` headers, eos after each response."""


class ChatTemplateEncoder:
  """Encodes chats with ``tokenizer``'s chat template (or FALLBACK_TEMPLATE if it has none).

  The loss mask covers, for every assistant turn, the text the template adds after the
  generation prompt up to the end of that turn: the response and its end-of-turn marker.
  Tokens come from one pass over the whole rendered text, so they are exactly what the model
  sees at inference; the mask is found from character offsets (a fast tokenizer is required).

  Args:
    tokenizer: a ``transformers`` fast tokenizer.
  """

  def __init__(self, tokenizer):
    if not getattr(tokenizer, "is_fast", False):
      raise ValueError(
          f"{type(tokenizer).__name__} is not a fast tokenizer; response masks "
          "need character offsets"
      )
    self.template = tokenizer.chat_template or FALLBACK_TEMPLATE
    if tokenizer.chat_template is None and tokenizer.eos_token is None:
      raise ValueError("the tokenizer has neither a chat_template nor an eos_token; set one")
    self.tokenizer = tokenizer
    self.vocab_size = len(tokenizer)
    self.eos_id = tokenizer.eos_token_id
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

  def _render(self, turns: Sequence[Turn], generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(
        list(turns),
        chat_template=self.template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )

  def encode_chat(self, turns: Sequence[Turn]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] int32 and loss mask [T] bool (True on assistant response tokens)."""
    check_turns(turns)
    text = self._render(turns, generation_prompt=False)
    spans = []
    for i, turn in enumerate(turns):
      if turn["role"] != "assistant":
        continue
      start = self._render(turns[:i], generation_prompt=True)
      end = self._render(turns[: i + 1], generation_prompt=False)
      if not (text.startswith(end) and end.startswith(start)):
        raise ValueError(
            f"the chat template renders turn {i} differently once later turns "
            "follow, so its response tokens cannot be located"
        )
      spans.append((len(start), len(end)))
    encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([first for first, _ in encoding["offset_mapping"]], np.int64)
    mask = np.zeros(len(starts), bool)
    for first, last in spans:
      mask |= (starts >= first) & (starts < last)
    return np.asarray(encoding["input_ids"], np.int32), mask

  def encode_prompt(self, turns: Sequence[Turn]) -> np.ndarray:
    """Ids [T] int32 of ``turns`` followed by the template's generation prompt."""
    check_turns(turns)
    text = self._render(turns, generation_prompt=True)
    return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

  def encode_completion(
      self, turns: Sequence[Turn], completion: str
  ) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the generation prompt of ``turns`` and of ``completion`` right after it.

    Split as lm-evaluation-harness's ``_encode_pair``: trailing whitespace of the prompt
    text moves into the completion, the two texts are encoded together, and the completion
    ids are those past the prompt's own encoding.
    """
    check_turns(turns)
    context = self._render(turns, generation_prompt=True)
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, completion = context[:-spaces], context[-spaces:] + completion
    whole = self.tokenizer(context + completion, add_special_tokens=False)["input_ids"]
    prompt = self.tokenizer(context, add_special_tokens=False)["input_ids"]
    return np.asarray(prompt, np.int32), np.asarray(whole[len(prompt) :], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens."""
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)
