"""The paper's grid of runs: which runs each table needs, as overrides of a preset's base config.

A run is a named list of ``--set KEY=VALUE`` overrides. The grid is the same for every preset;
a preset fixes the base config(s), the protected fraction p and interval H of the EPI and static
runs, the sweeps scaled to its run length, and which tables it covers.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Entry:
  """One run of the grid (trained once per seed)."""

  name: str
  tables: tuple[str, ...]  # the paper's tables and figures this run contributes to
  overrides: tuple[str, ...]  # ``--set`` overrides of the preset's base config


@dataclasses.dataclass(frozen=True)
class Preset:
  """A scale of the grid."""

  name: str
  configs: tuple[tuple[str, tuple[str, ...]], ...]  # (base config, the tables run on it)
  p: float  # protected fraction of the static and EPI runs of Tables 1-5
  interval: int  # H of the EPI runs (the paper's 500)
  p_sweep: tuple[float, ...]  # Fig. 6 / Tables 10 and 14, p included
  h_sweep: tuple[int, ...]  # Table 5, interval included
  analyses: tuple[str, ...]  # eval.analyses of the EPI run at (p, H), beside continual
  description: str
  runs: tuple[str, ...] = ()  # the grid's runs it trains (names of ``entries``); (): all
  first_seed: int = 0  # seeds first_seed, first_seed + 1, ...
  run_sets: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (run name, its own overrides)
  base: tuple[str, ...] = ()  # overrides that pretrain each seed's base model; (): none

  def __post_init__(self):
    if self.p not in self.p_sweep or self.interval not in self.h_sweep:
      raise ValueError(f"preset {self.name}: p and interval must be in their sweeps")


TUNING = "Baselines' settings"
"""The runs that choose LoRA's learning rate and EWC's lambda (not a table of the paper)."""
LORA_LRS = (3e-4, 1e-3, 3e-3)
EWC_LAMBDAS = (1e3, 1e5, 1e7)

ALL_TABLES = (
    "Table 1",
    "Table 2",
    "Table 3",
    "Table 4",
    "Table 5",
    "Table 6",
    "Table 7",
    "Table 9",
    "Fig. 6",
    "Table 10",
    "Table 11",
    "Table 12",
    "Table 13",
    "Table 14",
    "Table 15",
)
MAIN = ("Table 1", "Table 6", "Table 7", "Table 9")  # the methods' comparison and its analyses
MASK_ANALYSES = ("gradient_conflict", "flip_rate", "task_overlap", "perturbation")

CPU_SWEEPS = dict(
    p=0.01, interval=50, p_sweep=(0.005, 0.01, 0.02, 0.05, 0.2), h_sweep=(10, 50, 100, 200)
)
"""p and H of the cpu presets and their sweeps (H 10/50/100/200 for the paper's 100-2000)."""

CPU_BASE = (
    "data.tasks=[arithmetic,string_code,logic_choice,rewrite,dialogue]",
    "method.type=full",
    "optim.lr=5e-3",
    "train.steps_per_stage=1500",
    "eval.probe_tasks=[]",
    "eval.analyses=[continual]",
)
"""The cpu preset's base model: the tiny llama trained on a mixture of the five embedded tasks
(1500 steps of 32 rows, the old from-scratch preset's budget) before its stream of variants."""

INTERVAL_SMOLLM2 = 4
"""H of the smollm2 study: 3 refreshes in each stage of 12 steps."""

PRESETS = {
    "cpu": Preset(
        name="cpu",
        configs=(("configs/replicate/cpu.yaml", ALL_TABLES),),
        **CPU_SWEEPS,
        analyses=MASK_ANALYSES + ("nll",),
        description=(
            "the tiny decoder pretrained on the five embedded tasks, then fine-tuned on three "
            "harder variants (about a minute per run)"
        ),
        # The mixture trains as many steps as the three stages of the others together.
        run_sets=(("full", ("train.steps_per_stage=600",)),),
        base=CPU_BASE,
    ),
    "demo": Preset(
        # ``python -m epi_jax.demo``: the cpu grid's three main runs at one seed.
        name="demo",
        configs=(("configs/replicate/cpu.yaml", ("Table 1",)),),
        **CPU_SWEEPS,
        analyses=("nll",),
        description="sequential SFT, EPI and static isolation on the cpu preset's stream",
        runs=("sequential", "epi", "static"),
        base=CPU_BASE,
    ),
    "cpu_scratch": Preset(
        # The cpu preset before its base model (docs/replication.md has its grid): a randomly
        # initialized tiny llama through the five embedded tasks, where every sequential method
        # forgets 90-99.5%.
        name="cpu_scratch",
        configs=(("configs/replicate/cpu_scratch.yaml", ALL_TABLES),),
        **CPU_SWEEPS,
        analyses=MASK_ANALYSES,
        description="the tiny decoder from scratch on the five embedded tasks (minutes per run)",
    ),
    "smollm2": Preset(
        name="smollm2",
        configs=(("configs/replicate/smollm2.yaml", ("Table 1", "Table 6")),),
        p=0.01,
        interval=INTERVAL_SMOLLM2,
        p_sweep=(0.01,),
        h_sweep=(INTERVAL_SMOLLM2,),
        analyses=("nll",),
        description=(
            "SmolLM2-135M-Instruct through GSM8K, CodeAlpaca, LogiQA (local files), held-out "
            "NLL of each and of Alpaca (the general-ability probe)"
        ),
        runs=("epi", "sequential", "static", "ewc", "lora", "full"),
        # The mixture trains as many steps as the three stages of the others together; LoRA's
        # lr is smollm2_tuning's choice (its choice of EWC's lambda is the default, 1e3).
        run_sets=(
            ("full", ("train.steps_per_stage=36",)),
            ("lora", ("method.lora.lr=0.001",)),
        ),
    ),
    "smollm2_tuning": Preset(
        # The smollm2 study's baselines tuned on its first two stages at seed 100 on rows
        # 192-383 of each file (the study trains on rows 0-127 and scores rows 128-191): the
        # settings come from other examples and runs than the numbers they are judged by.
        name="smollm2_tuning",
        configs=(("configs/replicate/smollm2.yaml", (TUNING,)),),
        p=0.01,
        interval=INTERVAL_SMOLLM2,
        p_sweep=(0.01,),
        h_sweep=(INTERVAL_SMOLLM2,),
        analyses=(),
        description=(
            "LoRA's learning rate and EWC's lambda for the smollm2 study: GSM8K -> CodeAlpaca "
            "at seed 100 on rows the study does not use, the lowest final held-out NLL wins"
        ),
        first_seed=100,
    ),
    "paper": Preset(
        # Table 1 on all four backbones, the ablations on LLaMA-3 and Gemma-2 (as the paper).
        name="paper",
        configs=(
            ("configs/paper/llama3_8b.yaml", ALL_TABLES),
            ("configs/paper/gemma2_9b.yaml", ALL_TABLES),
            ("configs/paper/mistral_7b.yaml", MAIN),
            ("configs/paper/qwen2_7b.yaml", MAIN),
        ),
        p=0.01,
        interval=500,
        p_sweep=(0.005, 0.01, 0.02, 0.05),
        h_sweep=(100, 500, 1000, 2000),
        analyses=MASK_ANALYSES,
        description="the paper's four backbones on eight 80 GB GPUs (Section 3.3)",
    ),
}


def _short(x: float) -> str:
  """3e-4, 1e3: a power-of-ten setting in a run name."""
  mantissa, exponent = f"{x:.0e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _sets(base: dict, **changes) -> tuple[str, ...]:
  """``base`` with ``changes`` (keys with ``__`` for ``.``) as ``KEY=VALUE`` overrides."""
  merged = base | {k.replace("__", "."): v for k, v in changes.items()}
  return tuple(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in merged.items())


def _tuning_entries(lora: dict, ewc: dict) -> list[Entry]:
  """The runs that choose LoRA's lr and EWC's lambda on a stream's first two stages."""
  # Tuning chooses by held-out NLL on rows the study neither trains on nor scores (data.skip:
  # past its n_train + n_eval rows); the tasks' own metrics generate 16 tokens only.
  two_stages = {
      "data.tasks": "[gsm8k,code_alpaca]",
      "method.stages": "[[gsm8k],[code_alpaca]]",
      "data.skip": 192,
      "eval.analyses": "[nll]",
      "eval.max_new_tokens": 16,
  }
  return [
      Entry(f"lora_lr{_short(x)}", (TUNING,), _sets(two_stages | lora, method__lora__lr=x))
      for x in LORA_LRS
  ] + [
      Entry(f"ewc_lam{_short(x)}", (TUNING,), _sets(two_stages | ewc, method__ewc__lam=x))
      for x in EWC_LAMBDAS
  ]


def entries(preset: Preset, tables: tuple[str, ...] = ALL_TABLES) -> list[Entry]:
  """The runs of ``preset`` that ``tables`` need, each once (a run several tables use is one run)."""
  p, h = preset.p, preset.interval
  epi = {
      "method.type": "epi",
      "method.p": p,
      "method.beta": 0.99,
      "method.interval": h,
      "method.normalize": "layer_minmax",
      "method.budget": "global",
      "method.grouping": "given",
  }
  # The paper's static baseline (CPI-FT) ranks the probes' raw displacements (Table 2's
  # "Static Mask"; "+ Layer Norm" is the variant).
  static = {
      "method.type": "static",
      "method.p": p,
      "method.normalize": "none",
      "method.budget": "global",
      "method.grouping": "given",
  }
  analyses = "[" + ",".join(("continual",) + preset.analyses) + "]"
  # Table 7's methods also measure the gradient conflict (beside the preset's nll).
  measured = ["continual", "gradient_conflict"] + [a for a in ("nll",) if a in preset.analyses]
  tgc = (
      {"eval.analyses": "[" + ",".join(measured) + "]"}
      if "gradient_conflict" in preset.analyses
      else {}
  )
  multistage = {"method.type": "multistage"}
  lora = {"method.type": "lora", "method.grouping": "given"}
  ewc = {"method.type": "ewc", "method.grouping": "given"}
  grid = [
      Entry(
          "epi",
          tuple(t for t in ALL_TABLES if t != "Table 10"),  # Table 10 is static's p sweep
          _sets(epi, eval__analyses=analyses),
      ),
      Entry(
          "full", ("Table 1", "Table 6", "Table 7", "Table 9"), _sets({"method.type": "full"} | tgc)
      ),
      Entry("sequential", ("Table 1",), _sets(multistage, method__grouping="given")),
      Entry(
          "multistage_random",
          ("Table 1", "Table 6", "Table 7"),
          _sets(multistage | tgc, method__grouping="random"),
      ),
      Entry(
          "multistage_heuristic",
          ("Table 1", "Table 6", "Table 7"),
          _sets(multistage | tgc, method__grouping="heuristic"),
      ),
      Entry(
          "static",
          ("Table 1", "Table 2", "Table 6", "Table 7", "Table 9", "Fig. 6", "Table 10", "Table 14"),
          _sets(static | tgc),
      ),
      Entry("lora", ("Table 1",), _sets(lora)),
      Entry("ewc", ("Table 1",), _sets(ewc)),
      Entry("static_layer_norm", ("Table 2",), _sets(static, method__normalize="layer_minmax")),
      # Table 2's "EPI w/o Layer Norm" and Table 3's "Global Raw Scores" are one setting here.
      Entry("epi_global_raw", ("Table 2", "Table 3"), _sets(epi, method__normalize="none")),
      Entry("epi_per_layer", ("Table 3",), _sets(epi, method__budget="per_layer")),
      Entry("epi_beta0", ("Table 4",), _sets(epi, method__beta=0.0)),
      Entry("epi_beta0.9", ("Table 4",), _sets(epi, method__beta=0.9)),
  ]
  grid += _tuning_entries(lora, ewc)
  grid += [
      Entry(f"epi_H{x}", ("Table 5",), _sets(epi, method__interval=x))
      for x in preset.h_sweep
      if x != h
  ]
  for x in preset.p_sweep:
    if x != p:
      grid.append(Entry(f"epi_p{x:g}", ("Fig. 6", "Table 14"), _sets(epi, method__p=x)))
      grid.append(Entry(f"static_p{x:g}", ("Table 10", "Table 14"), _sets(static, method__p=x)))
  extra = dict(preset.run_sets)
  return [
      dataclasses.replace(e, overrides=e.overrides + extra.get(e.name, ()))
      for e in grid
      if set(e.tables) & set(tables) and (not preset.runs or e.name in preset.runs)
  ]


def seed_overrides(seed: int) -> tuple[str, ...]:
  """A seed moves the model initialization, the data order and the synthetic examples."""
  return (f"data.seed={seed}", f"train.seed={seed}")
