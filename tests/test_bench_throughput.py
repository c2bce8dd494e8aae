"""bench/throughput.py: the interleaved timing the classifier and generator benchmarks share."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from throughput import measure_interleaved  # noqa: E402


def test_sides_alternate_which_goes_first_and_warmup_steps_are_not_kept():
    calls = []
    batches = iter(range(100))

    def next_batch():
        calls.append("load")
        return next(batches)

    def data_train(batch):
        calls.append(f"data {batch}")
        return 4

    def random_train(batch):
        calls.append(f"random {batch}")
        return 4

    timings = measure_interleaved(next_batch, data_train, random_train, "fixed", steps=3, warmup=1)
    assert calls == [
        "load", "data 0", "random fixed",
        "random fixed", "load", "data 1",
        "load", "data 2", "random fixed",
        "random fixed", "load", "data 3",
    ]
    assert len(timings.data_seconds) == len(timings.load_seconds) == len(timings.random_seconds) == 3
    assert all(load <= total for load, total in zip(timings.load_seconds, timings.data_seconds))
    assert timings.images_per_step == 4
    assert "ratio" in timings.summary()


def test_sides_training_on_batches_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="one size"):
        measure_interleaved(lambda: None, lambda _: 4, lambda _: 3, None, steps=2, warmup=0)
