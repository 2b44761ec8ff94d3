"""Evaluation: metrics over generated answers (and, elsewhere, the tasks that produce them)."""
