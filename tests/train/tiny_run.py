"""A seconds-long training config for the trainer's tests: two tasks, two stages."""

TINY_YAML = """
model: {preset: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2}
data: {tasks: [logic_choice, rewrite], n_train: 48, n_eval: 4, seq_len: 112}
method: {type: epi, p: 0.05, interval: 2}
optim: {lr: 3.0e-3, batch_size: 8, micro_batch_size: 4}
train: {steps_per_stage: 3}
checkpoint: {every: 2, keep: 10, mask_history: full}
eval: {max_new_tokens: 4, batch_size: 4}
log: {every: 1, progress: false, tensorboard: true}
"""


def tiny_config_file(tmp_path) -> str:
  path = tmp_path / "tiny.yaml"
  path.write_text(TINY_YAML)
  return str(path)
