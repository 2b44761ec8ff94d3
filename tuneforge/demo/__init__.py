"""The self-contained demo: a generated world, generated support tickets, and the report."""
