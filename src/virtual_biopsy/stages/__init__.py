"""Layer 7: one thin module per DVC stage, run as ``python -m virtual_biopsy.stages.NAME`` (through
scripts/python.sh). Nothing outside stages/ imports them; of each other they import only common."""
