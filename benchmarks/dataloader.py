"""Detection loader throughput: images/s and peak RSS for NEU-DET train with the default hyp (mosaic, augment).

Every configuration (imgsz x workers x cache mode) runs in a fresh subprocess so peak RSS is not inherited from
the previous one. RSS is sampled every 20 ms over the whole process tree (main + workers; pages shared after
fork are counted once per process, so the sum overstates real use for workers > 0).

    python benchmarks/dataloader.py --batches 20 --imgsz 256 640 --workers 0 2
    python benchmarks/dataloader.py --cache none --yolov5-python /path/to/venv-with-yolov5/bin/python

The second form also runs YOLOv5 v7.0's own loader (PyPI ``yolov5==7.0.*``, installed in a separate
environment) with the same hyp, batch size and protocol: the baseline the data-pipeline issue compares with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml"
CACHES = ("none", "ram", "ram-jpeg", "disk")


def torch_stack_collate(batch: list) -> tuple:
    """The collate of v7.0 (torch.stack / torch.cat), for the same-operations baseline."""
    import torch

    images, labels, paths, shapes = zip(*batch)
    for i, lb in enumerate(labels):
        lb[:, 0] = i
    return torch.stack(images, 0), torch.cat(labels, 0), paths, shapes


def v7_path_loader(dataset, batch_size: int, workers: int):
    """Same data set with v7.0's operations: colour decode of grey images, tile resize + 2s canvas +
    cv2.warpAffine for mosaics, numpy flips, torch.stack collate."""
    import torch
    from torch.utils.data import DataLoader

    from utils.data.workers import init_worker

    dataset.fast_ops = False
    generator = torch.Generator()
    generator.manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      collate_fn=torch_stack_collate, worker_init_fn=init_worker, generator=generator,
                      persistent_workers=workers > 0)


def run_one(data: str, imgsz: int, workers: int, cache: str, batches: int, batch_size: int, warmup: int,
            baseline: bool = False) -> dict:
    """One configuration in this process; returns a JSON-able dict."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.peak_memory import PeakMemory
    from utils.data import create_dataloader, load_data_config, load_hyp

    config = load_data_config(data)
    with tempfile.TemporaryDirectory() as cache_dir, PeakMemory(interval=0.02, pss=False) as rss:
        start = time.perf_counter()
        loader, dataset = create_dataloader(config["train"], imgsz, batch_size, 32, hyp=load_hyp(), augment=True,
                                            cache=None if cache == "none" else cache, workers=workers, shuffle=True,
                                            seed=0, cache_dir=cache_dir)
        if baseline:
            loader = v7_path_loader(dataset, batch_size, workers)
        setup = time.perf_counter() - start
        images, t0 = 0, None
        for i, (imgs, *_rest) in enumerate(loader):
            if i == warmup:
                t0 = time.perf_counter()
            if i >= warmup:
                images += len(imgs)
            if i + 1 >= warmup + batches:
                break
        elapsed = time.perf_counter() - t0
        del loader, dataset
    return {"imgsz": imgsz, "workers": workers, "cache": "v7-path" if baseline else cache, "setup_s": round(setup, 2),
            "images_per_s": round(images / elapsed, 1), "peak_rss_mb": round(rss.peak_rss / 2**20)}


YOLOV5_SNIPPET = """
import json, sys, time, yaml
sys.path.insert(0, {root!r})
from benchmarks.peak_memory import PeakMemory
from yolov5.utils.dataloaders import create_dataloader
hyp = yaml.safe_load(open({hyp!r}))
config = yaml.safe_load(open({data!r}))
from pathlib import Path
train = str((Path({data!r}).parent / config["path"] / config["train"]).resolve())
with PeakMemory(interval=0.02, pss=False) as rss:
    start = time.perf_counter()
    loader, dataset = create_dataloader(train, {imgsz}, {batch_size}, 32, hyp=hyp, augment=True, workers={workers},
                                        shuffle=True, seed=0)
    setup = time.perf_counter() - start
    images, t0 = 0, None
    for i, (imgs, *_rest) in enumerate(loader):
        if i == {warmup}:
            t0 = time.perf_counter()
        if i >= {warmup}:
            images += len(imgs)
        if i + 1 >= {warmup} + {batches}:
            break
    elapsed = time.perf_counter() - t0
print(json.dumps({{"imgsz": {imgsz}, "workers": {workers}, "cache": "yolov5-v7", "setup_s": round(setup, 2),
                  "images_per_s": round(images / elapsed, 1), "peak_rss_mb": round(rss.peak_rss / 2**20)}}))
"""


def run_yolov5(python: str, args: argparse.Namespace, imgsz: int, workers: int) -> dict:
    """The same measurement with the real YOLOv5 v7.0 loader (PyPI ``yolov5`` 7.0.x installed in ``python``'s
    environment, never in ours: it pins old packages). Its own code decodes, augments and collates."""
    sys.path.insert(0, str(ROOT))
    from utils.train.config import DEFAULT_HYP

    code = YOLOV5_SNIPPET.format(root=str(ROOT), hyp=str(DEFAULT_HYP), data=str(Path(args.data).resolve()),
                                 imgsz=imgsz, batch_size=args.batch_size, workers=workers, warmup=args.warmup,
                                 batches=args.batches)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_sample_cpu(data: str, imgsz: int, samples: int, rounds: int = 3) -> dict:
    """CPU ms per training sample (one thread, rounds interleaved): ours vs v7.0's operations, same samples.

    CPU time instead of wall time, so other load on a shared machine barely moves the comparison.
    """
    import cv2

    sys.path.insert(0, str(ROOT))
    from utils.data import DetectionDataset, load_data_config, load_hyp

    cv2.setNumThreads(1)
    config = load_data_config(data)
    dataset = DetectionDataset(config["train"], imgsz, 16, augment=True, hyp=load_hyp(), seed=0)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds):
        for fast in (True, False):
            dataset.fast_ops = fast
            dataset.reseed(0)
            start = time.process_time()
            for i in range(samples):
                dataset[i]
            best[fast] = min(best[fast], (time.process_time() - start) / samples * 1e3)
    return {"imgsz": imgsz, "ours_ms": round(best[True], 2), "v7_ops_ms": round(best[False], 2),
            "speedup": round(best[False] / best[True], 2)}


def _run_subprocess(args: argparse.Namespace, imgsz: int, workers: int, cache: str, baseline: bool) -> dict:
    cmd = [sys.executable, __file__, "--single", "--data", args.data, "--imgsz", str(imgsz), "--workers",
           str(workers), "--cache", cache, "--batches", str(args.batches), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size)] + (["--baseline"] if baseline else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--imgsz", type=int, nargs="+", default=[256, 640])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline", action="store_true",
                        help="also time v7.0's operations (warpAffine, torch.stack collate; no cache) per setting")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per configuration, interleaved; the best images/s is shown (shared machines)")
    parser.add_argument("--per-sample", type=int, default=0, metavar="N",
                        help="also time N samples per size in one thread (CPU ms/sample, ours vs v7.0 operations)")
    parser.add_argument("--yolov5-python", metavar="PYTHON",
                        help="also time the real v7.0 loader: a python whose environment has PyPI yolov5==7.0.*")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one config, JSON out
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(run_one(args.data, args.imgsz[0], args.workers[0], args.cache[0], args.batches,
                                 args.batch_size, args.warmup, args.baseline)))
        return 0
    if args.per_sample:
        print(f"{'imgsz':>6} {'ours ms':>8} {'v7 ops ms':>10} {'speed-up':>9}   (CPU per sample, one thread)")
        for imgsz in args.imgsz:
            r = per_sample_cpu(args.data, imgsz, args.per_sample)
            print(f"{imgsz:>6} {r['ours_ms']:>8} {r['v7_ops_ms']:>10} {r['speedup']:>9}", flush=True)
    print(f"{'imgsz':>6} {'workers':>8} {'cache':>9} {'setup s':>8} {'images/s':>9} {'peak RSS MB':>12}")
    for imgsz in args.imgsz:
        for workers in args.workers:
            runs = [(cache, False) for cache in args.cache] + ([("none", True)] if args.baseline else [])
            best: dict[tuple, dict] = {}
            for _ in range(args.repeat):
                for cache, baseline in runs:
                    r = _run_subprocess(args, imgsz, workers, cache, baseline)
                    key = (cache, baseline)
                    if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
                        best[key] = r
            if args.yolov5_python:
                best[("yolov5", True)] = max((run_yolov5(args.yolov5_python, args, imgsz, workers)
                                              for _ in range(args.repeat)), key=lambda r: r["images_per_s"])
            for r in best.values():
                print(f"{r['imgsz']:>6} {r['workers']:>8} {r['cache']:>9} {r['setup_s']:>8} {r['images_per_s']:>9} "
                      f"{r['peak_rss_mb']:>12}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
