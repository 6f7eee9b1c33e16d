"""Evaluation: per-task metrics, the accuracy matrix and forgetting ratios."""

from epi_jax.eval.code_bleu import code_scores
from epi_jax.eval.evaluation import evaluate
from epi_jax.eval.gsm8k import gsm8k_answer, gsm8k_reference
from epi_jax.eval.judge import Judge, parse_rating
from epi_jax.eval.metrics import METRICS, Metric, avg_norm_score, headline_row
from epi_jax.eval.rouge import rouge_l

__all__ = [
    "METRICS", "Judge", "Metric", "avg_norm_score", "code_scores", "evaluate", "gsm8k_answer",
    "gsm8k_reference", "headline_row", "parse_rating", "rouge_l",
]
