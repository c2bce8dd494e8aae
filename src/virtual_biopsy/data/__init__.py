"""Layer 2: the raw layout and table schemas, the simulated test bed, importers, ingest, preprocess,
splits, quality checks and cohorts (no networks: models/ is its sibling, neither imports the other)."""
