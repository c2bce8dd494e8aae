"""``vbiopsy`` and its sub-commands (``cli.main`` lists them; each registers from its own module)."""
