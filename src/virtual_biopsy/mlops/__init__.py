"""Every MLflow call: runs and their tags (tracking), the model registry (registry), the pipeline's
parent run (pipeline_runs) and the team tracking server (server)."""
