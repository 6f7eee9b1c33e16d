"""The replication runner (``python -m epi_jax.replicate``, ``epi_jax.replicate.cli``): the
paper's grid (``epi_jax.replicate.grid``) run one trainer process per run. Finished runs
(summary.json under the same config) are skipped, interrupted ones resume from their last
checkpoint, and the end is a report (``epi_jax.report``) with the paper's claims beside ours.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time

import numpy as np
import yaml

from epi_jax.errors import InputError
from epi_jax.progress import ProgressBoard, run_trainer
from epi_jax.replicate import compare, grid, measure, paper
from epi_jax.report import load_run, write_report
from epi_jax.report.runs import PER_SEED_BASE
from epi_jax.train.loading import find_config, load_config, resume_conflicts, to_dict

FIRST = ("epi", "static", "sequential", "lora")
"""The runs of EPI against static isolation, sequential SFT and LoRA: trained first."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of the grid at one seed."""

  config: str  # base config: a path, or configs/... as the package ships it (``find_config``)
  entry: grid.Entry
  seed: int
  run_dir: str
  extra: tuple[str, ...] = ()  # overrides of every run: the user's --set, the NLL cache

  @property
  def overrides(self) -> list[str]:
    return [*self.extra, *self.entry.overrides, *grid.seed_overrides(self.seed)]

  def command(self, python: str = "python train.py") -> list[str]:
    sets = [x for o in self.overrides for x in ("--set", o)]
    config = find_config(self.config)
    return [*python.split(), "--config", config, *sets, "--run-dir", self.run_dir]


BASE = grid.Entry("base", (), ("checkpoint.save_model=true",))
"""The pretraining run of a preset with a base model (``Preset.base`` adds its overrides)."""


def base_jobs(preset: grid.Preset, seeds: int, out: str) -> dict[int, Job]:
  """Seed -> the run that pretrains the base model the grid's runs of that seed start from
  (``Preset.base``; {} without one). Its folder, ``<out>/base/<hash>``, is named by a hash of
  its whole config (run_dir aside): a grid trains it once per seed and reuses it while the
  config stays the same."""
  if not preset.base:
    return {}
  config = preset.configs[0][0]
  entry = dataclasses.replace(BASE, overrides=BASE.overrides + preset.base)
  jobs = {}
  for seed in range(preset.first_seed, preset.first_seed + seeds):
    job = Job(config, entry, seed, "")
    resolved = to_dict(load_config(find_config(config), job.overrides))
    resolved.pop("run_dir")
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    jobs[seed] = dataclasses.replace(job, run_dir=os.path.join(out, "base", digest))
  return jobs


def plan(preset: grid.Preset, seeds: int, out: str, extra: tuple[str, ...] = ()) -> list[Job]:
  """Every run of ``preset`` at ``seeds`` seeds from its first, in the order a partial replication is most
  useful: the runs of the main comparisons (``FIRST``) at every seed, Table 1's other methods,
  the p sweep (where the demo's settings come from), then the other ablations, seed by seed.
  With a base model, each run of a seed starts from that seed's (``base_jobs``)."""
  jobs = []
  # Every method of a seed reads the same before-training NLL evaluation (eval.nll_cache).
  extra = (*extra, f"eval.nll_cache={os.path.join(out, 'nll_cache')}")
  bases = base_jobs(preset, seeds, out)

  def sets(seed: int) -> tuple[str, ...]:
    if not bases:
      return extra
    return (*extra, f"model.checkpoint={os.path.join(bases[seed].run_dir, 'model')}")

  for config, tables in preset.configs:
    backbone = os.path.splitext(os.path.basename(config))[0]
    base = os.path.join(out, backbone) if len(preset.configs) > 1 else out
    jobs += [
        Job(config, e, seed, os.path.join(base, "runs", e.name, f"seed{seed}"), sets(seed))
        for seed in range(preset.first_seed, preset.first_seed + seeds)
        for e in grid.entries(preset, tables)
    ]
  order = {job: i for i, job in enumerate(jobs)}

  def rank(job: Job) -> tuple:
    if job.entry.name in FIRST:
      return 0, job.seed, order[job]
    tables = set(job.entry.tables)
    tier = 0 if tables & {"Fig. 6", "Table 10"} else 1 if "Table 1" in tables else 2
    return 1 + job.seed, tier, order[job]

  return sorted(jobs, key=rank)


def status(job: Job) -> str:
  """done (summary.json of this very config), partial (a checkpoint to resume) or new."""
  config = load_config(find_config(job.config), job.overrides)
  saved = os.path.join(job.run_dir, "config.yaml")
  if _finished(job) and os.path.exists(saved):
    with open(saved) as f:
      return "new" if resume_conflicts(yaml.safe_load(f), config) else "done"
  from epi_jax.train.checkpointing import RunCheckpoints  # orbax: only when a run is unfinished

  if os.path.isdir(os.path.join(job.run_dir, "checkpoints")):
    ckpt = RunCheckpoints(job.run_dir, keep=config.checkpoint.keep)
    latest = ckpt.latest_step()
    ckpt.close()
    if latest is not None and not resume_conflicts(ckpt.record(latest).config, config):
      return "partial"
  return "new"


class Progress:
  """Overall progress: a line on ``board`` per finished run, with the elapsed time and an
  estimate (the board shows the running runs)."""

  def __init__(self, total: int, skipped: int, jobs: int, board: ProgressBoard):
    self.total, self.done, self.jobs, self.board = total, skipped, jobs, board
    self.durations: list[float] = []
    self.failed: list[str] = []
    self.start = time.perf_counter()
    self.lock = threading.Lock()

  def finished(self, job: Job, seconds: float, ok: bool) -> None:
    with self.lock:
      self.done += 1
      self.durations.append(seconds)
      if not ok:
        self.failed.append(job.run_dir)
      left = self.total - self.done
      eta = np.mean(self.durations) * left / self.jobs
      self.board.message(
          f"[{self.done}/{self.total}] {job.entry.name} seed {job.seed} "
          f"{'done' if ok else 'FAILED'} in {seconds:.0f} s; elapsed "
          f"{(time.perf_counter() - self.start) / 60:.1f} min, about {eta / 60:.0f} min left"
      )


def _train(job: Job, resume: bool, out: str, progress: Progress) -> None:
  """One trainer process; its output goes to logs/<name>_seed<k>.log. The runs share a JAX
  compilation cache (the same programs recur across the grid)."""
  logs = os.path.join(out, "logs")
  os.makedirs(logs, exist_ok=True)
  log = os.path.join(logs, f"{job.entry.name}_seed{job.seed}.log")
  command = job.command(f"{sys.executable} -m epi_jax.train") + ["--set", "log.progress=false"]
  start = time.perf_counter()
  code = run_trainer(
      command + (["--resume"] if resume else []),
      run_dir=job.run_dir,
      log_path=log,
      cache_dir=os.path.join(out, "jax_cache"),
      board=progress.board,
      label=f"{job.entry.name} seed {job.seed}",
  )
  if code:
    progress.board.message(f"{job.run_dir}: the trainer exited with {code}; its output is in {log}")
  progress.finished(job, time.perf_counter() - start, code == 0)


def _finished(job: Job) -> bool:
  """A summary.json with scores (a run stopped by divergence writes one without); a base model
  also needs its model folder (a clone of committed results has the summary only)."""
  path = os.path.join(job.run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  if job.entry.name == BASE.name and not os.path.isdir(os.path.join(job.run_dir, "model")):
    return False
  with open(path) as f:
    return "final_accuracy" in json.load(f)


def write_outputs(preset: grid.Preset, jobs: list[Job], out: str, elapsed: float) -> str:
  """The report of the finished runs with the paper's claims beside ours; returns its path.

  The report's "learned" table is the check that every task reached 0.5 right after
  its own stage (the ``sequential`` run: forgetting is defined only for what was learned).
  """
  done = [j for j in jobs if _finished(j)]
  values: dict[str, dict[str, dict[int, float]]] = {}  # run name -> metric -> seed -> value
  seeds: dict[str, int] = {}
  runs = {job: load_run(job.run_dir) for job in done}  # each run read once
  for job, run in runs.items():
    seeds[job.entry.name] = seeds.get(job.entry.name, 0) + 1
    for k, v in measure.claim_metrics(run).items():
      if v is not None:
        values.setdefault(job.entry.name, {}).setdefault(k, {})[job.seed] = v
  table, counts = compare.comparison(paper.claims(preset.h_sweep, preset.interval), values)
  runs_time = sum(run.summary["wall_time_s"] for run in runs.values())
  header = (
      f"## Replication: preset `{preset.name}`\n\n{preset.description}. "
      f"{len(done)} of {len(jobs)} runs finished; this sitting took {elapsed / 60:.1f} min, "
      f"the finished runs' own wall times add up to {runs_time / 60:.1f} min.\n\n"
  )
  with open(os.path.join(out, "comparison.json"), "w") as f:
    json.dump({"values": values, "seeds": seeds, "verdicts": counts}, f, indent=1)
  return write_report(
      [j.run_dir for j in done],
      os.path.join(out, "report"),
      labels={j.run_dir: j.entry.name for j in done},
      title=f"EPI replication, preset {preset.name}",
      extra_markdown=header + table,
  )


DOCS_SECTIONS = (
    "Learned: score right after each task's own stage (mean ± std)",
    "Held-out NLL over the stages",
    "Held-out NLL forgetting and general-ability change per group",
    "Paired differences of held-out NLL",
    "Groups",
    "The paper beside ours",
)
"""The report's sections that ``--docs`` writes into a document."""


def docs_block(docs: str, preset: str) -> tuple[str, str, str]:
  """The text of ``docs`` and its block markers for ``preset``; InputError where either is
  missing (checked before any run trains)."""
  begin, end = f"<!-- replicate:{preset} begin -->", f"<!-- replicate:{preset} end -->"
  try:
    with open(docs) as f:
      text = f.read()
  except OSError as error:
    raise InputError(f"--docs {docs}: {error.strerror}") from None
  if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
    raise InputError(f"--docs {docs}: needs one {begin} line before one {end} line")
  return text, begin, end


def write_docs(report: str, preset: str, docs: str) -> None:
  """Replaces the block between ``<!-- replicate:PRESET begin -->`` and ``<!-- replicate:PRESET
  end -->`` in ``docs`` with the report's ``DOCS_SECTIONS`` (every heading one level down, image
  links made relative to ``docs``), so the numbers there come from the runs, not by hand."""
  text, begin, end = docs_block(docs, preset)
  with open(report) as f:
    sections = re.split(r"^## ", f.read(), flags=re.M)
  chosen = {
      s.split("\n", 1)[0]: re.sub(r"^(#+) ", r"#\1 ", "## " + s, flags=re.M) for s in sections[1:]
  }
  plots = os.path.relpath(os.path.dirname(report), os.path.dirname(os.path.abspath(docs)))
  block = "\n".join(chosen[h].rstrip() + "\n" for h in DOCS_SECTIONS if h in chosen)
  block = block.replace("](plots/", f"]({plots}/plots/")
  head, rest = text.split(begin)
  with open(docs, "w") as f:
    f.write(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")


def dry_run(preset: grid.Preset, jobs: list[Job]) -> int:
  """Checks every config of the grid without training: each loads, and the memory plan of
  each (backbone, method) builds."""
  from epi_jax.train.memory import memory_plan

  bad, plans = 0, {}
  for job in jobs:
    if job.seed != preset.first_seed:
      continue
    try:
      # The seed's base model (not trained yet) has the architecture of the preset's config.
      overrides = [
          o
          for o in job.overrides
          if not (o.startswith("model.checkpoint=") and PER_SEED_BASE.search(o))
      ]
      config = load_config(find_config(job.config), overrides)
      key = (job.config, config.method.type)
      if key not in plans:
        plans[key] = memory_plan(config)["parameters"]
      print(f"ok   {job.run_dir}: {plans[key]:,} parameters")
    except InputError as error:
      bad += 1
      print(f"FAIL {job.run_dir}: {error}")
  return 2 if bad else 0


def select(jobs: list[Job], runs: str | None, preset: str) -> list[Job]:
  """The jobs of the comma-separated run names ``runs`` (None: all); InputError for a name
  the grid does not have."""
  if not runs:
    return jobs
  names = runs.split(",")
  unknown = sorted(set(names) - {j.entry.name for j in jobs})
  if unknown:
    raise InputError(f"--runs: {', '.join(unknown)} not in the {preset} grid")
  return [j for j in jobs if j.entry.name in names]


def train_jobs(jobs: list[Job], out: str, parallel: int) -> list[str]:
  """Trains the unfinished ``jobs``, ``parallel`` at a time, skipping finished ones and
  resuming partial ones; returns the run directories that failed."""
  states = {job: status(job) for job in jobs}
  todo = [j for j in jobs if states[j] != "done"]
  print(
      f"{len(jobs)} runs: {len(jobs) - len(todo)} finished, "
      f"{sum(states[j] == 'partial' for j in todo)} to resume, "
      f"{sum(states[j] == 'new' for j in todo)} to start",
      flush=True,
  )
  board = ProgressBoard()
  progress = Progress(len(jobs), len(jobs) - len(todo), parallel, board)
  with board, concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    list(pool.map(lambda j: _train(j, states[j] == "partial", out, progress), todo))
  if progress.failed:
    print("failed runs:\n  " + "\n  ".join(progress.failed), file=sys.stderr)
  return progress.failed


def train_grid(
    preset: grid.Preset, seeds: int, jobs: list[Job], out: str, parallel: int
) -> list[str]:
  """Trains the seeds' base models (``base_jobs``), then ``jobs``; returns the run directories
  that failed (a failed base: its runs are not started)."""
  bases = list(base_jobs(preset, seeds, out).values())
  failed = train_jobs(bases, out, parallel) if bases else []
  return failed or train_jobs(jobs, out, parallel)
