"""Evaluation: exact-match accuracy of generations, the accuracy matrix and forgetting ratios."""
