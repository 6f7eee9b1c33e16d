"""Byte-level tokenizer and chat rendering for the embedded task suite."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from epi_jax.data.turns import ROLES, Turn, check_turns

PAD, BOS, EOS = 256, 257, 258
ROLE_IDS = {role: 259 + i for i, role in enumerate(ROLES)}  # system, user, assistant
VOCAB_SIZE = 259 + len(ROLES)  # 262
_SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"} | {
    token: f"<|{role}|>" for role, token in ROLE_IDS.items()
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""``encode_chat`` and ``encode_prompt`` as a Jinja chat template, for ``to_transformers``."""


class ByteTokenizer:
  """UTF-8 bytes 0-255 plus pad, bos, eos and one marker per chat role.

  A chat renders as ``<bos>`` then, for each turn, ``<|role|> content <eos>``. The loss mask
  covers the content bytes and the closing ``<eos>`` of every assistant turn.

  >>> tok = ByteTokenizer()
  >>> tok.decode(tok.encode("héllo"))
  'héllo'
  """

  vocab_size = VOCAB_SIZE
  pad_id = PAD
  bos_id = BOS
  eos_id = EOS

  def encode(self, text: str) -> list[int]:
    """The UTF-8 bytes of ``text``, one id each."""
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    """Text of ``ids``; special ids are dropped or, if ``skip_special=False``, named."""
    out, run = [], bytearray()
    for token in (int(i) for i in ids):
      if token < 256:
        run.append(token)
        continue
      if token not in _SPECIAL_NAMES:
        raise ValueError(f"token id {token} is outside the vocabulary (size {VOCAB_SIZE})")
      out.append(run.decode("utf-8", errors="replace"))
      run = bytearray()
      if not skip_special:
        out.append(_SPECIAL_NAMES[token])
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  def encode_chat(self, turns: Sequence[Turn]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] int32 and loss mask [T] bool (True on assistant content and its eos)."""
    check_turns(turns)
    ids, mask = [BOS], [False]
    for turn in turns:
      content = self.encode(turn["content"]) + [EOS]
      is_response = turn["role"] == "assistant"
      ids += [ROLE_IDS[turn["role"]], *content]
      mask += [False] + [is_response] * len(content)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  def encode_prompt(self, turns: Sequence[Turn]) -> np.ndarray:
    """Ids [T] int32 of ``turns`` followed by the assistant marker: the generation prompt."""
    ids, _ = self.encode_chat(turns)
    return np.append(ids, np.int32(ROLE_IDS["assistant"]))

  def encode_completion(
      self, turns: Sequence[Turn], completion: str
  ) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the generation prompt of ``turns`` and ids [C] int32 of ``completion`` after it."""
    return self.encode_prompt(turns), np.asarray(self.encode(completion), np.int32)

  def to_transformers(self):
    """This tokenizer as a transformers ``PreTrainedTokenizerFast`` with the same ids.

    A byte-level BPE without merges: byte b is the token spelling b in GPT-2's byte alphabet
    (id b), the special tokens keep their ids, and ``CHAT_TEMPLATE`` renders chats as
    ``encode_chat`` does. Like any transformers tokenizer it reads the special tokens' names
    (``<eos>``, ``<|user|>``, ...) inside text as those tokens, where ``encode`` spells them out
    byte by byte.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab |= {name: token for token, name in _SPECIAL_NAMES.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in _SPECIAL_NAMES.values()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_SPECIAL_NAMES[BOS],
        eos_token=_SPECIAL_NAMES[EOS],
        pad_token=_SPECIAL_NAMES[PAD],
        chat_template=CHAT_TEMPLATE,
    )
