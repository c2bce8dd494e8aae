-- Users and permissions of MLflow's basic-auth app live in their own database, so they can be
-- backed up and restored apart from the runs (VBIOPSY_AUTH_DATABASE_URI in compose.yaml).
CREATE DATABASE mlflow_auth;
