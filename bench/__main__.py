"""Run every benchmark, or the ones named: ``python -m bench [name ...]``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

from bench import (
    catalog,
    checkout,
    hostspeed,
    ledger,
    notifications,
    outbox_throughput,
    payment_webhooks,
    request_cpu,
    signin,
    webhook_delivery,
)

BENCHMARKS: dict[str, Callable[[list[str]], Awaitable[None]]] = {
    "outbox": outbox_throughput.main,
    "signin": signin.main,
    "catalog": catalog.main,
    "checkout": checkout.main,
    "payment_webhooks": payment_webhooks.main,
    "ledger": ledger.main,
    "notifications": notifications.main,
    "webhook_delivery": webhook_delivery.main,
    "request_cpu": request_cpu.main,
    "hostspeed": hostspeed.main,
}


def main() -> None:
    names = sys.argv[1:] or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        known = ", ".join(BENCHMARKS)
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; known: {known}")
    for name in names:
        print(f"== {name}")
        if name == "hostspeed":
            asyncio.run(BENCHMARKS[name]([]))
            continue
        # The host's speed around each benchmark: a shared machine's moves between runs.
        print(hostspeed.describe("before"))
        asyncio.run(BENCHMARKS[name]([]))
        print(hostspeed.describe("after"))


if __name__ == "__main__":
    main()
