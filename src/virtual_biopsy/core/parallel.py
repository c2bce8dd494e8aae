"""Ordered parallel map over files, with a progress bar: the one process-pool pattern of the stages."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_in_processes(function: Callable[[Item], Result], items: Sequence[Item], workers: int, *,
                     desc: str, unit: str) -> Iterator[Result]:
    """``function`` over ``items`` in input order, by ``workers`` processes (in-process when 1).

    ``function`` must be picklable (a module-level function or a functools.partial of one).
    """
    def bar(results: Iterable[Result]) -> Iterator[Result]:
        return tqdm(results, total=len(items), desc=desc, unit=unit, disable=None)

    if workers <= 1 or len(items) < 2:
        yield from bar(map(function, items))
        return
    # Chunks amortise inter-process overhead; several per worker keep the bar moving.
    chunksize = max(1, math.ceil(len(items) / (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from bar(pool.map(function, items, chunksize=chunksize))
