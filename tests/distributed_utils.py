"""Run a function on N CPU processes joined by a gloo process group, and collect the results."""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple, results) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results[rank] = ("ok", fn(rank, world, *args))
    except BaseException as err:  # reported to the parent test, which re-raises
        results[rank] = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, *args, world: int = 2) -> list:
    """fn(rank, world, *args) on every rank; returns each rank's ('ok', value) or ('error', text).

    `fn` must be importable (a module-level function) and return picklable values."""
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), fn, args, results),
                           nprocs=world, start_method="spawn")
        return [results[r] for r in range(world)]


def values(results: list) -> list:
    """The ranks' return values; fails the test with the first rank's traceback."""
    for status, value in results:
        if status != "ok":
            raise AssertionError(f"a rank failed:\n{value}")
    return [value for _, value in results]
