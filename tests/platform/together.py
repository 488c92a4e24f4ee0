"""Processes released at the same moment: for races between API processes starting
together on a new data directory."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def _when_released(read: Callable[[str], Any], argument: str, barrier: Any, answers: Any) -> None:
    barrier.wait()
    try:
        answers.put(read(argument))
    except Exception as exc:
        answers.put(f"failed: {exc!r}")


def answers_of_processes_released_together(
    read: Callable[[str], Any], argument: str, *, processes: int = 6
) -> set[Any]:
    """What ``read(argument)`` answered in each of ``processes`` forked processes
    released at once (a failure answers ``"failed: ..."``), as a set."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes)
    answers = context.Queue()
    starters = [
        context.Process(target=_when_released, args=(read, argument, barrier, answers))
        for _ in range(processes)
    ]
    for process in starters:
        process.start()
    found = {answers.get(timeout=60) for _ in starters}
    for process in starters:
        process.join(timeout=60)
    return found
