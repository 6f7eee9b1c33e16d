"""The names of the analyses a run can switch on with ``eval.analyses`` (docs/evaluation.md,
"Analyses"). Each is measured by a pure function of this package; the training loop runs them
through ``epi_jax.train.analyses.RunAnalyses`` (here before: import it from there)."""

ANALYSES = ("continual", "gradient_conflict", "flip_rate", "task_overlap", "perturbation", "nll")
"""The names ``eval.analyses`` accepts."""
