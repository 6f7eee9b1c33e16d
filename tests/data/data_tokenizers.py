"""Tiny local byte-level BPE tokenizers for the tests, with or without a chat template."""

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(chat_template):
  """A fast tokenizer over the 256 byte-level symbols plus a few merges and special tokens."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {symbol: i for i, symbol in enumerate(alphabet)}
  merges = [("t", "h"), ("th", "e"), ("Ġ", "the")]
  for left, right in merges:
    vocab[left + right] = len(vocab)
  model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = decoders.ByteLevel()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=model,
      bos_token="<s>",
      eos_token="</s>",
      pad_token="<pad>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"],
  )
  tokenizer.chat_template = chat_template
  return tokenizer
