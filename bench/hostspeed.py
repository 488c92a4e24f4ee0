"""How fast this host runs Python right now: a fixed piece of work, timed.

On a shared virtual machine the same build's figures move by a quarter or more between
runs minutes apart (the host's other guests, its clock, which physical core the virtual
one lands on), so a figure compared with one from another run, or another day, says
little unless the host's own speed at the time is known. ``python -m bench`` times this
work before and after each benchmark and prints both, so two runs can be told apart by
the host as well as by the build.

The work is what an API process spends its time on, in pure Python, the same every run:
building small dicts and lists, formatting strings, calling small functions and
methods, serializing JSON with the standard library and hashing bytes. It is timed in
process CPU (not wall time, which another process on the machine would lengthen), five
times, and the fastest run is the figure: a slower run is the host being interrupted, not
the work costing more.

    .venv/bin/python -m bench hostspeed
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass

# Rounds of the work in one timing: about 70 ms on the 2-core AMD EPYC VM of 2026-12-07.
ROUNDS = 2_000
TIMINGS = 5


@dataclass(frozen=True, slots=True)
class _Line:
    sku: str
    quantity: int
    unit_price: int

    def total(self) -> int:
        return self.quantity * self.unit_price


def _round(number: int) -> int:
    lines = [_Line(f"SKU-{number}-{i}", i % 5 + 1, 1_000 + 37 * i) for i in range(12)]
    card = {
        "id": f"{number:08x}",
        "title": f"Product {number}",
        "lines": [{"sku": line.sku, "total": line.total()} for line in lines],
        "tags": sorted({f"tag{i % 7}" for i in range(20)}),
    }
    card["total"] = sum(line["total"] for line in card["lines"])  # type: ignore[misc]
    text = json.dumps(card, separators=(",", ":"))
    return len(text) + hashlib.sha256(text.encode()).digest()[0]


def time_once(rounds: int = ROUNDS) -> float:
    """Process CPU seconds of ``rounds`` rounds of the work."""
    start = time.process_time()
    check = 0
    for number in range(rounds):
        check += _round(number)
    elapsed = time.process_time() - start
    if check <= 0:  # keeps the work from being skipped; never true
        raise AssertionError("the work produced nothing")
    return elapsed


def measure(timings: int = TIMINGS, rounds: int = ROUNDS) -> tuple[float, float]:
    """(fastest, median) milliseconds of ``timings`` timings of the work."""
    values = [time_once(rounds) * 1000 for _ in range(timings)]
    return min(values), statistics.median(values)


def describe(label: str) -> str:
    """``host speed (before)  41.2 ms a fixed Python workload (median 43.0; lower is
    faster)``."""
    fastest, median = measure()
    return (
        f"host speed ({label}) {fastest:.1f} ms a fixed Python workload "
        f"(median of {TIMINGS} {median:.1f}; lower is faster)"
    )


async def main(_argv: list[str]) -> None:
    print(describe("now"))
