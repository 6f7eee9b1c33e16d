"""Loads the real SmolLM2-135M-Instruct GGUF file (``make smollm2``) with ours and with
transformers; prints load times, the logits difference on a chat prompt and both greedy answers.

    make smollm2 && .venv/bin/python benchmarks/smollm2_gguf.py
"""

from __future__ import annotations

import importlib.metadata
import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from epi_jax.models import from_pretrained, load_tokenizer, resolve_checkpoint
from epi_jax.models.generate import generate

QUESTION = "What is the capital of France?"
NEW_TOKENS = 32


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main() -> None:
  path = resolve_checkpoint("smollm2-135m-instruct")
  print(
      f"{path} ({os.path.getsize(path) / 1e6:.0f} MB); jax {jax.__version__} on "
      f"{jax.device_count()} x {jax.devices()[0].platform}, transformers "
      f"{transformers.__version__}, torch {torch.__version__}, gguf {importlib.metadata.version('gguf')}"
  )
  _, header_s = timed(lambda: gguf.GGUFReader(path))
  (model, config), ours_s = timed(lambda: from_pretrained(path))
  _, scanned_s = timed(lambda: from_pretrained(path, scan_layers=True))
  _, bf16_s = timed(lambda: from_pretrained(path, dtype=jnp.bfloat16))
  tokenizer, tokenizer_s = timed(lambda: load_tokenizer(path))
  reference, torch_s = timed(
      lambda: transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path),
          gguf_file=os.path.basename(path),
          dtype=torch.float32,
          attn_implementation="eager",
      ).eval()
  )
  print("| load | seconds |\n|---|---|")
  for name, seconds in (
      ("gguf.GGUFReader (metadata + tensor table)", header_s),
      ("from_pretrained, float32", ours_s),
      ("from_pretrained, float32, scan_layers", scanned_s),
      ("from_pretrained, bfloat16", bf16_s),
      ("load_tokenizer", tokenizer_s),
      ("transformers AutoModelForCausalLM (gguf_file=)", torch_s),
  ):
    print(f"| {name} | {seconds:.1f} |")

  prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
  )
  ids = np.asarray([tokenizer(prompt)["input_ids"]])
  with torch.no_grad():
    want = reference(torch.from_numpy(ids)).logits.numpy()
    torch_new = reference.generate(
        torch.from_numpy(ids),
        attention_mask=torch.ones_like(torch.from_numpy(ids)),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
    )[0, ids.shape[1] :]
  got = np.asarray(model(jnp.asarray(ids)))
  new = np.asarray(generate(model, jnp.asarray(ids), max_new_tokens=NEW_TOKENS))[0]
  new = new[: len(torch_new)]
  print(
      f"prompt {ids.shape[1]} tokens: max |logits - torch| {np.abs(got - want).max():.2e}, "
      f"max |logits| {np.abs(want).max():.1f}, same argmax at "
      f"{np.mean(got.argmax(-1) == want.argmax(-1)):.0%} of positions"
  )
  print(f"greedy, {len(torch_new)} tokens: identical={np.array_equal(new, torch_new.numpy())}")
  print(f"ours:  {tokenizer.decode(new, skip_special_tokens=True)!r}")
  print(f"torch: {tokenizer.decode(torch_new, skip_special_tokens=True)!r}")


if __name__ == "__main__":
  main()
