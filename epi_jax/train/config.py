"""The trainer's configuration: nested frozen dataclasses, one per YAML section.

Each field carries its documentation as the string literal under it and, where it has one,
its valid range as field metadata (``ge``, ``gt``, ``le``, ``lt``); ``Literal`` types list the
valid choices. ``epi_jax.train.loading`` reads YAML into these classes and checks them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


def bounded(default, **bounds):
  """A dataclass field with a default and range bounds (ge, gt, le, lt) checked on load."""
  return dataclasses.field(default=default, metadata=bounds)


@dataclasses.dataclass(frozen=True)
class ModelSection:
  preset: Literal[
      "tiny", "smollm2_135m", "llama3_8b", "llama3_1_8b", "mistral_7b", "qwen2_7b", "gemma2_9b"
  ] = "tiny"
  """A classmethod of epi_jax.models.ModelConfig: the paper's backbones or the CPU model."""
  family: Literal["llama", "mistral", "qwen2", "gemma2"] = "llama"
  """Family of the tiny preset (the large presets fix their own)."""
  hidden_size: int = bounded(64, ge=8)
  """Tiny preset only: model width."""
  intermediate_size: int = bounded(128, ge=8)
  """Tiny preset only: MLP width."""
  num_layers: int = bounded(2, ge=1)
  """Tiny preset only: number of transformer blocks."""
  num_heads: int = bounded(4, ge=1)
  """Tiny preset only: attention heads (head_dim = hidden_size / num_heads)."""
  checkpoint: str = ""
  """Checkpoint to start from: a Hugging Face folder (config.json + safetensors + tokenizer), a
  llama.cpp .gguf file (tokenizer and chat template included), or the alias
  smollm2-135m-instruct (installed by ``make smollm2``); empty: random init."""
  dtype: Literal["float32", "bfloat16"] = "float32"
  """Dtype the parameters are stored in. bfloat16 halves their memory; their updates are then
  applied with stochastic rounding, and gradients and optimizer state stay float32."""
  compute_dtype: Literal["", "float32", "bfloat16"] = ""
  """Dtype of the forward and backward (parameters cast where used, activations in it; norm
  statistics, softmax, logits and the loss in float32); empty: ``dtype``."""
  scan_layers: bool = False
  """Stack the blocks and run them in one scan: compile time independent of depth."""
  remat: Literal["none", "block", "dots"] = "none"
  """Recompute activations in the backward pass: none; block (keep each block's input only);
  dots (keep matmul outputs, recompute the elementwise ops)."""


@dataclasses.dataclass(frozen=True)
class DataSection:
  source: Literal["synthetic", "hf"] = "synthetic"
  """synthetic: the embedded tasks (byte tokenizer); hf: the paper's datasets via load_chats."""
  tasks: list[str] = dataclasses.field(
      default_factory=lambda: ["arithmetic", "string_code", "logic_choice", "rewrite", "dialogue"]
  )
  """Task names in the paper's order (synthetic: TASK_NAMES; hf: DATASET_NAMES)."""
  files: dict[str, str] = dataclasses.field(default_factory=dict)
  """hf only: task -> local .jsonl/.json/.parquet file in the hub schema (missing: the hub)."""
  n_train: int = bounded(2000, ge=1)
  """Training examples per task (hf: the first n_train rows)."""
  n_eval: int = bounded(64, ge=1)
  """Held-out evaluation examples per task (hf: the n_eval rows after the training ones)."""
  skip: int = bounded(0, ge=0)
  """hf: rows of each stream task's file left out before the training rows, e.g. to tune
  on rows a study neither trains on nor scores (probe tasks keep their first rows)."""
  shuffle: bool = False
  """hf: draw the training and held-out rows at random (by ``data.seed``) from the
  ``n_train + n_eval`` rows after ``skip``, so each seed trains and scores its own subset;
  false: the first ``n_train`` rows train, the next ``n_eval`` are held out."""
  seq_len: int = bounded(128, ge=8)
  """Tokens per training row; longer examples are cut, and those whose response would start
  past it are left out (they would train nothing)."""
  pack: bool = False
  """Pack several whole examples into each row (attention and positions stay per example),
  planned best fit over ``pack_window`` examples at a time; false: one example per row, padded."""
  pack_window: int = bounded(256, ge=1)
  """pack only: examples planned into rows together (longest first, each into the fullest row
  it fits); 256 fills rows 96-98% on GSM8K, CodeAlpaca and LogiQA at seq_len 512."""
  seed: int = bounded(0, ge=0)
  """Seed of the synthetic tasks, the data order and the random grouping."""


@dataclasses.dataclass(frozen=True)
class LoraSection:
  rank: int = bounded(8, ge=1)
  """r: inner dimension of each adapter a @ b."""
  alpha: float = bounded(16.0, gt=0.0)
  """The adapters' update is scaled by alpha / rank."""
  dropout: float = bounded(0.0, ge=0.0, lt=1.0)
  """Probability of dropping an input feature of the LoRA path while training."""
  targets: list[str] = dataclasses.field(
      default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"]
  )
  """Kernels that get adapters (q, k, v, o, gate, up, down)."""
  lr: float = bounded(0.0, ge=0.0)
  """Peak learning rate of the adapters (same warm-up and cosine schedule as ``optim.lr``);
  0: ``optim.lr``. LoRA usually wants about 10x the full fine-tuning rate."""


@dataclasses.dataclass(frozen=True)
class EWCSection:
  lam: float = bounded(1000.0, ge=0.0)
  """lambda of the penalty lambda/2 * sum F (theta - theta*)^2."""
  online: bool = False
  """false: the exact sum of every finished stage's penalty; true: online EWC (one decayed
  Fisher, anchored at the last stage's weights)."""
  gamma: float = bounded(1.0, ge=0.0, le=1.0)
  """online only: decay of the accumulated Fisher at each new stage."""
  fisher_batches: int = bounded(4, ge=1)
  """Training batches of the finished stage whose per-example squared gradients give F."""
  examples_per_chunk: int = bounded(0, ge=0)
  """Per-example gradients held at once while computing F (a divisor of optim.batch_size);
  0: the whole batch."""


@dataclasses.dataclass(frozen=True)
class MethodSection:
  type: str = "epi"
  """A method of epi_jax.train.methods.METHODS: full (one uniform mixture of all tasks);
  multistage (sequential SFT), static, epi, lora, ewc (stages in sequence)."""
  grouping: Literal["given", "random", "heuristic"] = "given"
  """How tasks form stages (not used by full): stages as listed, random, or by skill."""
  stages: list[list[str]] = dataclasses.field(default_factory=list)
  """grouping=given: task names per stage; empty: one stage per task in data.tasks order."""
  num_stages: int = bounded(3, ge=1)
  """grouping=random: how many stages the shuffled tasks are dealt into."""
  p: float = bounded(0.01, ge=0.0, lt=1.0)
  """static, epi: protected fraction of all parameters."""
  beta: float = bounded(0.99, ge=0.0, lt=1.0)
  """epi: EMA factor of the sensitivity (Eq. 5)."""
  interval: int = bounded(500, ge=1)
  """epi: refresh the mask every ``interval`` optimizer steps (H)."""
  normalize: Literal["layer_minmax", "none"] = "layer_minmax"
  """static, epi: per-group min-max normalization of the scores (Eq. 7-8) or raw scores."""
  budget: Literal["global", "per_layer"] = "global"
  """static, epi: one global top-p or top-p inside each group."""
  layer_of: Literal["block", "leaf"] = "block"
  """static, epi: normalization groups: transformer blocks or single parameters."""
  sensitivity: Literal["grad_sq", "adam_nu"] = "grad_sq"
  """epi: EMA of g^2, or the inner Adam second moment (no extra memory)."""
  sensitivity_dtype: Literal["float32", "bfloat16"] = "float32"
  """epi with grad_sq: dtype of the sensitivity."""
  probe_steps: int = bounded(0, ge=0)
  """static: optimizer steps of each per-task probe run; 0: one epoch of the task."""
  lora: LoraSection = dataclasses.field(default_factory=LoraSection)
  """lora: the adapters."""
  ewc: EWCSection = dataclasses.field(default_factory=EWCSection)
  """ewc: the Fisher penalty."""


@dataclasses.dataclass(frozen=True)
class OptimSection:
  lr: float = bounded(1e-5, gt=0.0)
  """Peak learning rate of AdamW."""
  warmup_ratio: float = bounded(0.03, ge=0.0, lt=1.0)
  """Fraction of the schedule's steps spent in linear warm-up before the cosine decay."""
  schedule: Literal["run", "stage"] = "run"
  """Span of the warm-up + cosine schedule: run (once over all stages) or stage (restarted at
  each stage, as when each task of a stream is fine-tuned in turn)."""
  end_lr_ratio: float = bounded(0.0, ge=0.0, le=1.0)
  """Final learning rate as a fraction of the peak."""
  weight_decay: float = bounded(0.0, ge=0.0)
  """Decoupled weight decay of AdamW."""
  b1: float = bounded(0.9, ge=0.0, lt=1.0)
  """Adam first-moment decay."""
  b2: float = bounded(0.999, ge=0.0, lt=1.0)
  """Adam second-moment decay."""
  eps: float = bounded(1e-8, gt=0.0)
  """Adam epsilon."""
  clip_norm: float = bounded(1.0, ge=0.0)
  """Clip gradients to this global norm before AdamW; 0: no clipping."""
  batch_size: int = bounded(64, ge=1)
  """Examples per optimizer step."""
  micro_batch_size: int = bounded(0, ge=0)
  """Examples per forward/backward pass; gradients of batch_size/micro_batch_size passes are
  accumulated (a scan); 0: batch_size."""


@dataclasses.dataclass(frozen=True)
class TrainSection:
  epochs: float = bounded(3.0, gt=0.0)
  """Passes over each stage's examples (the full method: over all examples)."""
  steps_per_stage: int = bounded(0, ge=0)
  """If > 0, optimizer steps per stage instead of ``epochs``."""
  seed: int = bounded(0, ge=0)
  """Seed of the model initialization."""
  on_divergence: Literal["stop", "warn"] = "stop"
  """When the run diverges (the logged loss NaN/inf, or at 3 logged steps in a row above
  2 x ln(vocab_size) or flat at ln(vocab_size); docs/trainer.md, "Divergence"): stop (write
  summary.json with the reason, save nothing more, exit 3) or warn (log it and train on)."""


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int = bounded(500, ge=0)
  """Save every ``every`` optimizer steps (0: only at stage ends); stage ends always save."""
  keep: int = bounded(3, ge=1)
  """How many of the latest checkpoints to keep."""
  mask_history: Literal["stats", "full"] = "stats"
  """stats: statistics of every refresh; full: also the bit-packed mask of every refresh."""
  save_model: bool = True
  """At the end, write the trained model (lora: merged with its adapters) to
  ``<run_dir>/model`` as a Hugging Face folder with the run's tokenizer; any checkpoint
  exports with ``python -m epi_jax.export``."""


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int = bounded(1, ge=1)
  """Data-parallel axis: replicas of the parameters."""
  fsdp: int = bounded(1, ge=1)
  """Fully sharded data-parallel axis: the batch and the parameters' model width are split."""
  tensor: int = bounded(1, ge=1)
  """Tensor-parallel axis: heads, MLP width and vocabulary are split."""


@dataclasses.dataclass(frozen=True)
class JudgeSection:
  url: str = ""
  """OpenAI-compatible chat-completions endpoint of the 1-10 judge of the "judge" tasks
  (alpaca, ultrachat), e.g. http://localhost:8000/v1; empty: no judge, ROUGE-L proxy."""
  model: str = ""
  """The judge model's name, sent as ``model``."""
  api_key_env: str = ""
  """Name of the environment variable that holds the API key (the key itself is never
  written anywhere); empty: no key sent."""
  timeout: float = bounded(60.0, gt=0.0)
  """Seconds to wait for one reply."""
  retries: int = bounded(3, ge=0)
  """Further attempts after a failed request, with exponential backoff (1, 2, 4, ... s)."""
  workers: int = bounded(4, ge=1)
  """Requests in flight at once."""


@dataclasses.dataclass(frozen=True)
class EvalSection:
  max_new_tokens: int = bounded(32, ge=1)
  """Greedy generation length (GSM8K and CodeAlpaca solutions need a few hundred tokens)."""
  batch_size: int = bounded(64, ge=1)
  """Prompts (or multiple-choice option rows) per generation (likelihood) call."""
  judge: JudgeSection = dataclasses.field(default_factory=JudgeSection)
  """The LLM judge; replies are cached in ``<run_dir>/judge_cache.jsonl``."""
  analyses: list[
      Literal["continual", "gradient_conflict", "flip_rate", "task_overlap", "perturbation", "nll"]
  ] = dataclasses.field(default_factory=lambda: ["continual"])
  """Analyses to run (docs/evaluation.md, "Analyses"): continual (ACC, BWT, FWT,
  max-forgetting; one evaluation before training), gradient_conflict (TGC at stage ends),
  flip_rate (per-group mask flips, epi), task_overlap (Jaccard of per-task top-p masks at
  stage ends), perturbation (S against measured loss changes at 25/50/100%, epi), nll
  (held-out response NLL per example before training and after each stage; forgetting in
  nats per token; ``<run_dir>/heldout_nll.json``)."""
  metric_examples: int = bounded(0, ge=0)
  """Held-out examples per task that each task's own metric scores after every stage (the
  first ones); 0: all ``data.n_eval``. Generation dominates a small model's evaluation: a
  study scoring NLL on many examples may generate for fewer."""
  nll_examples: int = bounded(0, ge=0)
  """nll: held-out examples scored per task (the first ones, the same for every method of a
  data seed); 0: all ``data.n_eval``. Paired comparisons want 64 or more."""
  probe_tasks: list[str] = dataclasses.field(default_factory=list)
  """Tasks no stage trains, measured before training and after the last stage (the
  general-ability probe, a base model's own skills): continual scores them with their metric
  (their forgetting ratio in summary.json), nll by their held-out NLL. synthetic: a task of
  TASK_NAMES not in data.tasks; hf: a dataset of DATASET_NAMES (its file from data.files, else
  the hub), e.g. alpaca."""
  nll_cache: str = ""
  """Directory of before-training evaluations (the nll analysis's NLL, continual's scores),
  keyed by a hash of the untrained model, the examples and the evaluation settings: runs of
  other methods of the seed read them instead of recomputing them; empty: no cache."""


@dataclasses.dataclass(frozen=True)
class LogSection:
  every: int = bounded(10, ge=1)
  """Write loss, learning rate and throughput to metrics.jsonl every ``every`` steps."""
  tensorboard: bool = True
  """Also write TensorBoard event files (tensorboardX) to the run directory."""
  progress: bool = True
  """Show a progress bar (tqdm) with loss, tokens/s and the protected fraction."""


@dataclasses.dataclass(frozen=True)
class Config:
  run_dir: str = "runs/default"
  """Directory of checkpoints, metrics, event files, config.yaml and summary.json."""
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  """The decoder."""
  data: DataSection = dataclasses.field(default_factory=DataSection)
  """The tasks."""
  method: MethodSection = dataclasses.field(default_factory=MethodSection)
  """Training method and its isolation options."""
  optim: OptimSection = dataclasses.field(default_factory=OptimSection)
  """AdamW and its warm-up + cosine schedule."""
  train: TrainSection = dataclasses.field(default_factory=TrainSection)
  """Training length and initialization."""
  checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
  """Orbax checkpoints."""
  mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
  """Device mesh (data, fsdp, tensor)."""
  eval: EvalSection = dataclasses.field(default_factory=EvalSection)
  """Evaluation of every task by its own metric after each stage."""
  log: LogSection = dataclasses.field(default_factory=LogSection)
  """Metrics and progress output."""


# Keys whose change does not alter the trained parameters: a resume may change them.
RESUME_FREE = (
    "run_dir",
    "train.on_divergence",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.save_model",
    "method.lora.save_merged",  # retired (checkpoint.save_model): in checkpoints of older runs
    "log.every",
    "log.tensorboard",
    "log.progress",
    "eval.judge.api_key_env",
    "eval.judge.timeout",
    "eval.judge.retries",
    "eval.judge.workers",
    "eval.nll_cache",
)
