"""Layer 0: config (frozen dataclasses from params.yaml), project paths, atomic writes, the process-pool map.

Imports nothing else of the package.
"""
