"""What each method adds to a DDP training step: collectives, bytes, and their measured cost.

Spawns `--world` ranks joined by a process group (gloo on CPU, nccl with `--device cuda`) and
runs fastbml's Trainer on the synthetic task with each method. Per method it reports

* the collectives the method itself issues per training step (counted by wrapping the
  torch.distributed calls), their payload, and the one-time ones of the first step (the
  ranks' agreement check), next to DDP's own gradient all-reduce (counted by a comm hook);
* the median step time under DDP with the method's synchronisation on, and with it switched
  off (the helper's group set to None: the same computation without the collective);
* D&R's collectives and time per diagnosis, when fastbml.DiagnoseRelearn is available;
* what the Trainer adds per epoch: the loss all-reduce, the buffer broadcast and the sharded
  evaluation's all-gather.

`--world1` instead measures one process's step with and without an initialised process group
of size 1: the distributed code path must cost nothing there.

    python -m benchmarks.ddp_comm                       # 2 gloo CPU ranks
    python -m benchmarks.ddp_comm --device cuda --world 2
    python -m benchmarks.ddp_comm --world1 [--device cuda]

Not a `bench_*` module: benchmarks/report.py does not discover it (no `cases(device)`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from fastbml.data import SyntheticConfig, make_synthetic
from fastbml.train import Trainer, make_config

METHODS = ("joint", "ogm", "ogm-ge", "opm", "opm+ogm-ge", "dr")
_WRAPPED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
            "reduce_scatter_tensor", "barrier", "all_gather_object", "broadcast_object_list")


class CommCounter:
    """Counts the Python-level torch.distributed collectives (outermost calls only) and their
    payload: a tensor's bytes, or an object's pickled size, as this rank sends it."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.bytes = 0
        self._depth = 0
        self.enabled = False

    def reset(self) -> None:
        self.calls, self.bytes = {}, 0

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def _size(self, name: str, args) -> int:
        if name == "barrier" or not args:
            return 0
        first = args[1] if name in ("all_gather", "all_gather_into_tensor",
                                    "reduce_scatter_tensor") else args[0]
        if isinstance(first, torch.Tensor):
            return first.numel() * first.element_size()
        if name == "all_gather_object":
            return len(pickle.dumps(args[1]))
        return len(pickle.dumps(first))

    @contextmanager
    def installed(self):
        originals = {name: getattr(dist, name) for name in _WRAPPED}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                outer = self.enabled and self._depth == 0
                if outer:
                    self.calls[name] = self.calls.get(name, 0) + 1
                    self.bytes += self._size(name, args)
                self._depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._depth -= 1
            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def _calls(calls: dict[str, float]) -> str:
    return ", ".join(f"{n:g} {name}" for name, n in sorted(calls.items())) or "-"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(args, method: str, out: str) -> dict:
    return dict(method=method, batch_size=args.batch, epochs=4, dr_every=1, dr_times=3,
                progress=False, tensorboard=False, plots=False, out=out,
                device=args.device, threads=1, seed=0)


def _splits(args, world: int):
    n = args.batch * world * args.steps
    return make_synthetic(0, SyntheticConfig(n_train=n, n_val=args.val, n_test=64,
                                             layout=args.layout))


def _batches(trainer: Trainer, count: int):
    """`count` of this rank's training batches (cycled), already on the device."""
    out = []
    while len(out) < count:
        for inputs, labels in trainer.train_loader:
            out.append(({m: inputs[m].to(trainer.device) for m in trainer.modalities},
                        labels.to(trainer.device)))
            if len(out) == count:
                break
    return out


def _time_interleaved(pairs, device, ranked: bool = True) -> list[float]:
    """Median step seconds of each (trainer, batches), their steps alternated, ranks aligned
    by an untimed barrier before each step."""
    for trainer, _ in pairs:
        trainer.model.train()
        trainer.methods.train(True)
    times: list[list[float]] = [[] for _ in pairs]
    for i in range(len(pairs[0][1])):
        for j, (trainer, batches) in enumerate(pairs):
            if ranked:
                dist.barrier()
            _sync(device)
            started = time.perf_counter()
            trainer.train_step(*batches[i], epoch=1)
            _sync(device)
            times[j].append(time.perf_counter() - started)
    return [statistics.median(t[2:]) for t in times]


def _unsync(trainer: Trainer) -> None:
    """Switch the helpers' cross-rank synchronisation off (same work, no collective)."""
    for helper in (trainer.methods.ogm, trainer.methods.opm):
        if helper is not None:
            helper.group = None


def _rank_job(rank: int, world: int, init_file: str, args, results) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        args.device = str(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    rows = []
    counter = CommCounter()
    try:
        with counter.installed(), tempfile.TemporaryDirectory() as tmp:
            splits = _splits(args, world)
            # one all_reduce of M = 2 float32 scores: what OGM / OPM add per step
            probe = torch.ones(2, device=device)
            lat = []
            for _ in range(200):
                _sync(device)
                started = time.perf_counter()
                dist.all_reduce(probe)
                _sync(device)
                lat.append(time.perf_counter() - started)
            rows.append({"probe_all_reduce_s": statistics.median(lat[20:])})
            for method in args.methods:
                row = {"method": method}
                out = os.path.join(tmp, method.replace("+", "_"))
                # -- counting: method collectives per step, DDP buckets via a comm hook
                trainer = Trainer(make_config("demo", **_config(args, method, out)), splits)
                grad = {"buckets": 0, "bytes": 0}

                def hook(state, bucket, grad=grad):
                    grad["buckets"] += 1
                    grad["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
                    counter._depth += 1  # DDP's own all-reduce: not the method's
                    try:
                        return default_hooks.allreduce_hook(None, bucket)
                    finally:
                        counter._depth -= 1

                trainer.ddp.register_comm_hook(None, hook)
                batches = _batches(trainer, args.steps)
                trainer.model.train()
                trainer.methods.train(True)
                counter.enabled = True
                trainer.train_step(*batches[0], epoch=1)
                row["first_step"] = (dict(counter.calls), counter.bytes)
                counter.reset()
                grad.update(buckets=0, bytes=0)
                for inputs, labels in batches[1:]:
                    trainer.train_step(inputs, labels, epoch=1)
                steps = len(batches) - 1
                row["per_step"] = ({k: v / steps for k, v in counter.calls.items()},
                                   counter.bytes / steps)
                row["grad"] = (grad["buckets"] / steps, grad["bytes"] / steps)
                counter.reset()
                trainer._train_epoch(1)
                # what the Trainer adds per epoch: the epoch's collectives minus the steps'
                n_steps = len(trainer.train_loader)
                calls = {k: v - round(row["per_step"][0].get(k, 0) * n_steps)
                         for k, v in counter.calls.items()}
                row["epoch"] = ({k: v for k, v in calls.items() if v},
                                counter.bytes - row["per_step"][1] * n_steps)
                counter.reset()
                trainer.evaluate(splits.val)
                row["eval"] = (dict(counter.calls), counter.bytes)
                counter.reset()
                if trainer.methods.dr is not None:
                    started = time.perf_counter()
                    trainer.methods.after_epoch(1, trainer._feature_fn(splits.train),
                                                trainer._feature_fn(splits.val))
                    row["dr"] = (dict(counter.calls), counter.bytes,
                                 time.perf_counter() - started)
                    counter.reset()
                counter.enabled = False
                # -- timing: sync on / off, fresh trainers without the comm hook, their steps
                # interleaved so that drift in the machine's load hits both alike
                pairs = []
                for sync in (True, False):
                    trainer = Trainer(make_config("demo", **_config(args, method, out)), splits)
                    batches = _batches(trainer, args.steps)
                    trainer.train_step(*batches[0], epoch=1)  # first-step agreement check
                    if not sync:
                        _unsync(trainer)
                    pairs.append((trainer, batches))
                times = _time_interleaved(pairs, device)
                row["on"], row["off"] = times
                rows.append(row)
        results[rank] = ("ok", rows)
    except BaseException as err:  # reported by the parent
        import traceback

        results[rank] = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _print_world(args, rows) -> None:
    probe = rows[0]["probe_all_reduce_s"]
    print(f"{args.world} ranks, backend {'nccl' if args.device.startswith('cuda') else 'gloo'}, "
          f"{args.layout} synthetic, batch {args.batch} per rank; medians of {args.steps - 2} "
          f"steps\nall_reduce of 2 float32 (one method sync): {probe * 1e6:.0f} us\n")
    head = (f"{'method':11s} {'per step: method collectives':30s} {'bytes':>6s} "
            f"{'DDP grad (buckets, bytes)':>26s} {'step ms sync':>13s} {'no sync':>8s} "
            f"{'diff ms':>8s}")
    print(head)
    print("-" * len(head))
    for row in rows[1:]:
        calls, nbytes = row["per_step"]
        buckets, gbytes = row["grad"]
        print(f"{row['method']:11s} {_calls(calls):30s} {nbytes:6.0f} {buckets:12g} x {gbytes / 1e6:8.3f} MB "
              f"{row['on'] * 1e3:13.3f} {row['off'] * 1e3:8.3f} "
              f"{(row['on'] - row['off']) * 1e3:+8.3f}")
    print("\nfirst step only (agreement check), per epoch (Trainer), evaluation of val "
          f"({args.val} rows):")
    for row in rows[1:]:
        print(f"{row['method']:11s} first: {_calls(row['first_step'][0])} "
              f"({row['first_step'][1]} B); epoch: {_calls(row['epoch'][0])} "
              f"({row['epoch'][1]:.0f} B); eval: {_calls(row['eval'][0])} ({row['eval'][1]} B)")
        if "dr" in row:
            calls, nbytes, seconds = row["dr"]
            print(f"{'':11s} D&R per diagnosis: {_calls(calls)} ({nbytes} B), "
                  f"{seconds * 1e3:.1f} ms")


def _world(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(_rank_job, args=(args.world, os.path.join(tmp, "init"), args, results),
                           nprocs=args.world, start_method="spawn")
        for rank in range(args.world):
            status, value = results[rank]
            if status != "ok":
                raise SystemExit(f"rank {rank} failed:\n{value}")
        _print_world(args, results[0][1])


def _world1(args) -> None:
    """One process: the step of a Trainer built without any process group against one built
    with a process group of size 1 initialised, their steps interleaved."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    splits = _splits(args, 1)
    methods = list(args.methods)
    with tempfile.TemporaryDirectory() as tmp:
        plain = {m: Trainer(make_config("demo", **_config(args, m, f"{tmp}/a")), splits)
                 for m in methods}
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1)
        ranked = {m: Trainer(make_config("demo", **_config(args, m, f"{tmp}/b")), splits)
                  for m in methods}
        times = {}
        for m in methods:
            assert plain[m].ddp is None and ranked[m].ddp is None
            batches = _batches(plain[m], args.steps)
            pairs = [(plain[m], batches), (ranked[m], batches)]
            times[m] = _time_interleaved(pairs, device, ranked=False)
        dist.destroy_process_group()
    print(f"one process on {device}, batch {args.batch}, {args.layout} synthetic; median step ms "
          f"of {args.steps - 2}, interleaved")
    print(f"{'method':11s} {'no group':>9s} {'group of 1':>11s} {'diff':>8s}")
    for m in methods:
        a, b = times[m]
        print(f"{m:11s} {a * 1e3:9.3f} {b * 1e3:11.3f} {(b - a) / a * 100:+7.1f}%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn (default 2)")
    parser.add_argument("--world1", action="store_true",
                        help="one process: step time with and without a process group of size 1")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--batch", type=int, default=64, help="batch per rank (default 64)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    parser.add_argument("--val", type=int, default=1000, help="val rows (default 1000)")
    parser.add_argument("--layout", default="vector", choices=("vector", "av"),
                        help="synthetic layout: vector (MLPs) or av (ResNet-18s)")
    parser.add_argument("--threads", type=int, default=1, help="--world1: torch CPU threads")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.world1:
        _world1(args)
    else:
        _world(args)


if __name__ == "__main__":
    main()
