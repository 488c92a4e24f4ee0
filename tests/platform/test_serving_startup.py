"""A new worker process has a grace to answer its first health check (it imports Soko
first); after that answer, uvicorn's own check applies. The supervisor's side, with a
process and a pipe standing in for the worker."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from soko.platform import serving
from soko.platform.serving import STARTUP_GRACE_SECONDS, ReusePortConfig, ReusePortProcess


class _OsProcess:
    """The operating system's side of a worker: running or not."""

    def __init__(self) -> None:
        self.running = True
        self.started = False

    def start(self) -> None:
        self.started = True

    def is_alive(self) -> bool:
        return self.running


def _started_ago(worker: ReusePortProcess, seconds: float) -> None:
    worker._started_at = time.monotonic() - seconds


def _worker() -> tuple[ReusePortProcess, _OsProcess]:
    config = ReusePortConfig("tests.platform.serve_app:app", workers=2, log_config=None)
    worker = ReusePortProcess(config, [])
    os_process = _OsProcess()
    worker.process = os_process  # type: ignore[assignment]
    worker.start()
    assert os_process.started
    return worker, os_process


def _answer(worker: ReusePortProcess, started: bool = False) -> None:
    """The worker's health thread: read one ping, answer it."""
    assert worker.child_conn.poll(5)
    worker.child_conn.recv()
    worker.child_conn.send(started)


def test_a_worker_still_starting_is_alive_while_the_grace_lasts() -> None:
    worker, _ = _worker()
    # No answer yet: alive, and asked once (not once per check).
    assert worker.is_alive(timeout=5)
    _started_ago(worker, STARTUP_GRACE_SECONDS - 5)
    assert worker.is_alive(timeout=5)
    assert worker.child_conn.recv() == b"ping"
    assert not worker.child_conn.poll(0)
    _started_ago(worker, STARTUP_GRACE_SECONDS + 1)
    assert not worker.is_alive(timeout=5)


def test_a_worker_whose_process_ended_is_dead_at_once() -> None:
    worker, os_process = _worker()
    os_process.running = False
    assert not worker.is_alive(timeout=5)


def test_after_its_first_answer_uvicorns_check_applies() -> None:
    worker, _ = _worker()
    assert worker.is_alive(timeout=5)
    _answer(worker)
    assert worker.is_alive(timeout=5)
    # Answered once: each later check waits for an answer to its own ping, within its
    # timeout, however young the worker is.
    answering = threading.Thread(target=_answer, args=(worker, True))
    answering.start()
    assert worker.is_alive(timeout=5)
    answering.join()
    assert not worker.is_alive(timeout=0.01)  # no answer now: hung


def test_a_replacement_started_by_a_reload_gets_the_grace_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[float] = []

    def wait_until_ready(self: object, timeout: float, should_exit: object = None) -> bool:
        asked.append(timeout)
        return True

    monkeypatch.setattr(serving.multiprocess.Process, "wait_until_ready", wait_until_ready)
    worker, _ = _worker()
    assert worker.wait_until_ready(5)
    assert asked == [STARTUP_GRACE_SECONDS]


def test_serve_runs_workers_as_reuse_port_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[type] = []

    class _Supervisor:
        def __init__(self, config: uvicorn.Config, sockets: list[object]) -> None:
            made.append(serving.multiprocess.Process)

        def run(self) -> None:
            pass

    monkeypatch.setattr(serving.multiprocess, "Multiprocess", _Supervisor)
    monkeypatch.setattr(serving.multiprocess, "Process", serving.multiprocess.Process)
    config = ReusePortConfig("tests.platform.serve_app:app", host="127.0.0.1", port=0, workers=2)
    serving.run_workers(config)
    assert made == [ReusePortProcess]
