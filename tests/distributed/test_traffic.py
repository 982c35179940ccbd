"""bench/distributed_traffic.py: the bytes a split tiny model hands to its collectives per decoded token, as
counted, are what the formula the 26B-A4B arithmetic uses says (so the paper numbers rest on a checked formula)."""

import sys

import pytest

from paths import BENCH

sys.path.insert(0, str(BENCH))

import distributed_traffic  # noqa: E402


@pytest.fixture(scope="module")
def measured():
    return distributed_traffic.measure(tokens=4)


@pytest.mark.parametrize("split", ["tensor", "experts"])
def test_counted_traffic_is_the_formula(measured, split):
    got = measured[split]
    want = distributed_traffic.per_token(measured["shape"], 2, split == "tensor", 4)  # float32 activations
    assert got["all_reduce"] == want["all_reduce"]
    assert got.get("gather", 0) == want.get("gather", 0)
