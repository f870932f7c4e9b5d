"""What every DataLoader worker process does first: seed itself, stay single-threaded, and yield the CPU."""

from __future__ import annotations

import os
import random

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

WORKER_NICENESS = 19
"""Scheduling priority added to each loader worker (Unix ``nice``).

On a CPU-bound machine the trainer's intra-op threads and the loader workers share the same cores. Every time
a worker preempts one of the trainer's threads, the other threads wait for it at the end of the parallel
region, so a millisecond of augmentation costs the step up to a millisecond per thread. At the lowest
priority the workers run in the gaps the trainer leaves (Python dispatch, the optimizer, single-threaded
ops) and the prefetched batches absorb the rest: on a 2-core CPU the recipe trains ~8 % faster
(interleaved 20-batch runs, see README). Where cores are idle, as behind a GPU, niceness changes nothing.
"""


def init_worker(worker_id: int) -> None:
    """Worker init: lowest priority, OpenCV single-threaded, per-worker seeds for numpy/random/the data set.

    torch gives every worker ``base_seed + worker_id`` (base seed drawn from the loader's seeded generator), so
    streams differ between workers and epochs yet repeat for the same seed.
    """
    if hasattr(os, "nice"):  # not on Windows
        os.nice(WORKER_NICENESS)
    cv2.setNumThreads(0)  # the workers are the parallelism; OpenCV threads would oversubscribe the cores
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(worker_seed)
