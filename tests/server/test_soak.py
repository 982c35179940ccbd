"""A short soak of `gemma4 serve` (bench/soak.py, whose full run `make bench` makes): mixed load on loopback,
then greedy probes equal to those before it, no 5xx, no hang, and no memory kept by refused requests."""

import sys

from paths import BENCH

sys.path.insert(0, str(BENCH))

import soak  # noqa: E402

# A refused over-context request carries a ~200 KB body; one kept per request would grow the server by
# ~15.6 MiB over the 80 of them a flood of FLOOD requests sends (the four refused kinds take turns). The first
# flood warms the allocator and the tokenizer (measured: +40 MiB once, then 0-9 MiB per later flood of 160,
# the allocator's own noise), so 12 MiB sits between the noise and one leaked body per request.
FLOOD_GROWTH = 12 * 2**20
FLOOD = 320


def test_soak_probes_unchanged_no_5xx_no_hang_no_growth():
    res = soak.soak(seconds=20, threads=8, flood_seconds=120, flood_requests=FLOOD)
    text, ok = soak.report(res)
    print(text)
    assert res["before"] == res["after"], text
    assert ok, text
    over_context = sum(n for (kind, _), n in res["floods"][1].counts.items() if kind == "over context")
    rss = res["rss"]
    assert rss["after refused flood 2"] - rss["after refused flood 1"] <= FLOOD_GROWTH, text
    assert over_context >= FLOOD // 4 and res["mix"].total("2xx") >= 10, text  # the load did happen


def test_the_server_caps_the_allocator_arenas_on_glibc():
    import platform

    import subprocess

    if platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("not glibc: its arenas are not capped")
    # in a process of its own: the cap holds for the rest of the process that sets it
    r = subprocess.run([sys.executable, "-c", "from gemma4.server.malloc import cap_arenas; print(cap_arenas())"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
