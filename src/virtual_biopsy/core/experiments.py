"""The ``dvc exp run`` command that applies params.yaml overrides (a profile, a tuning result).

DVC, not this package, runs the experiment: the command is printed for the user (or run by
``--run``/``--apply``), so what applied a setting is visible and repeatable.
"""
from __future__ import annotations

import json
import re
from typing import Any


HYDRA_SPECIAL = re.compile(r"[{}\[\]()'\",=:\s\\]")


def exp_run_command(overrides: dict[str, Any], name: str) -> list[str]:
    """``dvc exp run -n NAME -S key=value ...`` for dotted params.yaml keys."""
    sets = []
    for key, value in overrides.items():
        # dvc's -S takes Hydra override values: lists as JSON, numbers and strings as they are,
        # and null/true/false spelt so (str() would give "None", which Hydra keeps as a string).
        # A string with a character of Hydra's grammar ({view} of generator.pretrained_weights,
        # brackets, quotes, commas, spaces) goes quoted, else Hydra reads it as a dict or fails.
        quoted = isinstance(value, str) and HYDRA_SPECIAL.search(value) is not None
        rendered = json.dumps(value) if quoted or value is None or isinstance(value, (list, dict, bool)) else str(value)
        sets += ["-S", f"{key}={rendered}"]
    return ["dvc", "exp", "run", "-n", name, *sets]
