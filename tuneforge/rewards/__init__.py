"""Reward graders for RL methods (GRPO, RLVR, RLAIF), in the JSON shapes of OpenAI's fine-tuning graders.

A grader config (``string_check``, ``text_similarity``, ``python``, ``score_model``, ``multi``) is loaded
with :func:`tuneforge.rewards.graders.load_grader` and scores ``(sample, item)`` pairs: ``sample`` is the
model's completion (``output_text``, optional ``output_json``), ``item`` is the dataset row. User code in
``python`` graders runs in :mod:`tuneforge.rewards.sandbox`, never in the training process.
"""
