"""Experiment tracking: MLflow runs, metrics, artifacts and the model registry (``mlflow_tracker``), and the
``tuneforge ui`` launcher (``ui``). MLflow is imported only when a run starts, because importing it takes
seconds."""
