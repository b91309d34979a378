"""Evaluation: sampling, judges, KL drift."""
