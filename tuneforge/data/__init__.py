"""Training data: reading files, checking records, cleaning and splitting them.

The pipeline is ``readers`` (file → raw records with their line) → ``formats`` (is a record valid, and its
canonical form) → ``validate`` (a report naming every bad record) → ``sanitize`` (dedup, drop empties,
length limits, deterministic train/validation split). Tokenisation and batching live in sibling modules.
"""
