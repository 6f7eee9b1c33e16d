"""CodeBLEU of generated code (CodeAlpaca), computed by the ``codebleu`` package (the ``eval``
extra).

References:
  Ren et al., "CodeBLEU: a Method for Automatic Evaluation of Code Synthesis",
  arXiv:2009.10297. Package ``codebleu`` 0.7 (k4black/codebleu): `calc_codebleu(references,
  predictions, lang)` with equal weights 0.25 on its four components; it needs
  tree-sitter-python 0.21 (newer grammars fail inside codebleu).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from epi_jax.extras import require

_COMPONENTS = ("ngram_match", "weighted_ngram_match", "syntax_match", "dataflow_match")


def require_codebleu() -> Callable:
  """``codebleu.calc_codebleu`` (the package and its Python grammar, the ``eval`` extra), or
  ``epi_jax.extras.MissingExtra``."""
  codebleu = require("codebleu", "eval", "the codebleu metric")
  require("tree_sitter_python", "eval", "the codebleu metric")  # codebleu imports it on use
  return codebleu.calc_codebleu


def code_scores(
    predictions: Sequence[str], references: Sequence[str], *, lang: str = "python"
) -> dict[str, float | None]:
  """CodeBLEU, its four components and corpus BLEU, each in [0, 1].

  Returns:
    ``codebleu``; ``ngram_match`` (corpus BLEU-4 over whitespace tokens with NLTK smoothing
    method 1, codebleu's own BLEU), ``weighted_ngram_match`` (keywords weighted 1, other
    tokens 0.2), ``syntax_match`` (shared AST subtrees), ``dataflow_match`` (shared data-flow
    edges; 0 when the references have none, which codebleu then counts as 1 in ``codebleu``);
    ``bleu`` equals ``ngram_match``: the corpus BLEU of the generations. All None for no
    examples.
  """
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not predictions:
    return dict.fromkeys(("codebleu", *_COMPONENTS, "bleu"))
  raw = require_codebleu()(list(references), list(predictions), lang=lang)
  out = {"codebleu": float(raw["codebleu"])}
  out |= {name: float(raw[f"{name}_score"]) for name in _COMPONENTS}
  out["bleu"] = out["ngram_match"]
  return out
