"""Overlap work on small CPUs: ordered thread pipelines for batches, forked processes for plots.

Validation on a 2-core CPU leaves one core idle whenever single-threaded work runs (NMS, matching, drawing
PNGs). Two batches in flight, each computed with half the intra-op threads, keep both cores busy; plots are
drawn by forked processes because matplotlib holds the GIL while it renders.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Set ``torch``'s intra-op thread count inside the block (threads created inside inherit it), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pipelined(items: Iterable[Item], work: Callable[[Item], Result], streams: int = 2) -> Iterator[tuple[Item, Result]]:
    """Yield ``(item, work(item))`` in input order with up to ``streams`` items being worked on at once.

    Each stream gets ``torch.get_num_threads() // streams`` intra-op threads, so the machine is shared, not
    oversubscribed. ``work`` must not touch shared state; the caller consumes the results in order (in its own
    thread, overlapping the next items' work), which keeps everything deterministic. ``streams <= 1`` runs
    serially in the calling thread.
    """
    if streams <= 1:
        for item in items:
            yield item, work(item)
        return
    with intra_op_threads(torch.get_num_threads() // streams), ThreadPoolExecutor(streams) as pool:
        in_flight: deque = deque()
        for item in items:
            in_flight.append((item, pool.submit(work, item)))
            if len(in_flight) >= streams:
                done_item, future = in_flight.popleft()
                yield done_item, future.result()
        while in_flight:
            done_item, future = in_flight.popleft()
            yield done_item, future.result()


def cpu_streams(device: torch.device) -> int:
    """Batches to keep in flight: 2 on a CPU with at least 2 intra-op threads, else 1 (GPUs queue work already)."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def prefetch_module(name: str) -> None:
    """Import ``name`` in a background thread (e.g. matplotlib while the model runs).

    A later ``import`` of the same module waits on Python's per-module import lock until this one is done.
    """
    threading.Thread(target=importlib.import_module, args=(name,), daemon=True).start()


def run_jobs_in_processes(jobs: Sequence[tuple[Callable[..., Any], tuple]], workers: int = 2) -> list[Any]:
    """Run ``fn(*args)`` for each job in forked worker processes and return the results in order.

    Forked children inherit every module the parent has imported, so start-up costs nothing; where ``fork`` is
    not available (Windows), with one job, or with ``workers <= 1`` the jobs run here, one after another.
    Exceptions from a job are re-raised here.
    """
    workers = min(workers, len(jobs), os.cpu_count() or 1)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(*args) for fn, args in jobs]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        return [future.result() for future in futures]
