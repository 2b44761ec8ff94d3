"""Evaluation: tasks over local JSONL, a batched log-likelihood and generation engine, paired bootstrap intervals.

The pieces, each one module:

* :mod:`~tuneforge.eval.tasks` — the task YAML schema (multiple choice, generation, perplexity) and loading;
  :mod:`~tuneforge.eval.bundled` — the suites that ship by name (``general``);
* :mod:`~tuneforge.eval.loglik` (KV-cached continuation scoring), :mod:`~tuneforge.eval.generate` (greedy, stops at
  the template's end of turn), :mod:`~tuneforge.eval.metrics` (string metrics), :mod:`~tuneforge.eval.scores`
  (metrics as per-item statistics);
* :mod:`~tuneforge.eval.runner` — ``evaluate(model, tokenizer, tasks)``; :mod:`~tuneforge.eval.api` — by model
  reference, with reports and MLflow logging;
* :mod:`~tuneforge.eval.bootstrap` — paired intervals and verdicts; :mod:`~tuneforge.eval.report` — markdown, PNG,
  JSON; :mod:`~tuneforge.eval.harness` — lm-evaluation-harness as a second engine;
* :mod:`~tuneforge.eval.cli` — ``tuneforge eval`` / ``tuneforge compare``; :mod:`~tuneforge.eval.training` — the
  recipe's ``eval:`` section.
"""
