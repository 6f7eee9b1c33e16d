"""Evaluation: per-task metrics, the accuracy matrix, forgetting ratios and the analyses."""

from epi_jax.eval.code_bleu import code_scores
from epi_jax.eval.continual import continual_summary
from epi_jax.eval.evaluation import evaluate
from epi_jax.eval.gradient_conflict import gradient_conflict, task_gradient_conflict
from epi_jax.eval.gsm8k import gsm8k_answer, gsm8k_reference
from epi_jax.eval.judge import Judge, parse_rating
from epi_jax.eval.mask_drift import flip_rates, refresh_flip_rates
from epi_jax.eval.paired import PairedDifference, paired_difference
from epi_jax.eval.metrics import METRICS, Metric, avg_norm_score, exact_match, headline_row
from epi_jax.eval.perturbation import importance_vs_perturbation
from epi_jax.eval.rouge import rouge_l
from epi_jax.eval.task_overlap import pairwise_jaccard, task_overlap

__all__ = [
    "METRICS",
    "Judge",
    "Metric",
    "PairedDifference",
    "avg_norm_score",
    "code_scores",
    "evaluate",
    "exact_match",
    "gsm8k_answer",
    "gsm8k_reference",
    "headline_row",
    "paired_difference",
    "parse_rating",
    "rouge_l",
    "continual_summary",
    "flip_rates",
    "gradient_conflict",
    "importance_vs_perturbation",
    "pairwise_jaccard",
    "refresh_flip_rates",
    "task_gradient_conflict",
    "task_overlap",
]
