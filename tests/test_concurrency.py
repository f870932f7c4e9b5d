"""utils/common/concurrency.py: ordered pipelines, thread budgets, forked jobs."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from utils.common.concurrency import intra_op_threads, pipelined, run_jobs_in_processes


def _slow_square(x: int) -> tuple[int, int, str]:
    time.sleep(random.Random(x).uniform(0, 0.01))  # later items often finish first
    return x * x, torch.get_num_threads(), threading.current_thread().name


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_pipelined_keeps_order_and_splits_threads(streams):
    before = torch.get_num_threads()
    with intra_op_threads(4):
        out = list(pipelined(range(20), _slow_square, streams))
    assert [item for item, _ in out] == list(range(20))
    assert [result[0] for _, result in out] == [x * x for x in range(20)]
    assert {result[1] for _, result in out} == {max(1, 4 // streams)}
    workers = {result[2] for _, result in out}
    assert (workers == {threading.current_thread().name}) == (streams == 1)
    assert torch.get_num_threads() == before


def test_pipelined_holds_at_most_streams_items():
    started: list[int] = []
    consumed: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        return x

    for item, _ in pipelined(range(10), work, streams=2):
        assert max(started) <= item + 1  # at most `streams` items (this one included) in flight
        consumed.append(item)
    assert consumed == list(range(10))


def _raise_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x + 1


def test_run_jobs_in_processes_results_in_order_and_errors_propagate():
    assert run_jobs_in_processes([(_raise_on_three, (k,)) for k in (0, 1, 2, 4)]) == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="three"):
        run_jobs_in_processes([(_raise_on_three, (k,)) for k in (1, 3)])
