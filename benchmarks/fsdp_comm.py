"""What sharded OGM-GE adds to an FSDP2 step: its collectives, their bytes, and their time.

Spawns `--world` gloo ranks (nccl with `--device cuda`), shards two ResNet-18 encoders (audio
spectrogram and visual frame encoders of fastbml.models) with `fully_shard`, runs one backward,
and then times, with the ranks aligned by an untimed barrier before each step and the variants
interleaved:

* the sharded OGM-GE step (`fastbml.OGM.step` on the DTensor gradients: the scores' all_reduce,
  the [T, 3] float64 moments all_reduce over the sharding group, the local modulation);
* the moments all_reduce alone, and the scores' all_reduce alone (200 back to back each);
* for scale, the DDP-style step: OGM-GE on whole (unsharded) gradients, as every DDP rank runs
  it (its only collective is the scores' all_reduce).

It also counts the Python-level collectives of one sharded step and their payload, next to
the bytes of the gradients FSDP itself reduce-scatters per step.

    python -m benchmarks.fsdp_comm            # 2 gloo CPU ranks; writes benchmarks/results/
    python -m benchmarks.fsdp_comm --device cuda --world 2

Not a `bench_*` module: benchmarks/report.py does not discover it (no `cases(device)`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

import fastbml
from fastbml.models.resnet import FrameResNet18, SpectrogramResNet18

from .ddp_comm import CommCounter, _calls, _sync
from .report import device_name, write_table

VARIANTS = ("sharded OGM-GE step", "moments all_reduce alone (200 back to back)",
            "scores all_reduce alone (200 back to back)", "whole-gradient OGM-GE step (DDP)")


def _backward(args, device, rank):
    """Two sharded ResNet-18 encoders and a plain head after one backward; the unimodal
    logits and labels of this rank's batch."""
    torch.manual_seed(0)
    audio, visual = SpectrogramResNet18().to(device), FrameResNet18().to(device)
    head = nn.Linear(2 * audio.out_dim, 10).to(device)
    for encoder in (audio, visual):
        fully_shard(encoder)
    g = torch.Generator().manual_seed(rank)
    x_a = torch.randn(args.batch, 1, 64, 64, generator=g).to(device)
    x_v = torch.randn(args.batch, 3, 1, 64, 64, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    fa, fv = audio(x_a), visual(x_v)
    u_a, u_v = fastbml.concat_unimodal_logits([fa, fv], head.weight, head.bias)
    nn.functional.cross_entropy(head(torch.cat([fa, fv], dim=1)), y).backward()
    return audio, visual, {"audio": u_a.detach(), "visual": u_v.detach()}, y


def _rank_job(rank: int, world: int, init_file: str, args, results) -> None:
    torch.set_num_threads(1)
    # the encoders return flattened (view) features; nothing here writes to them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        audio, visual, logits, y = _backward(args, device, rank)
        ogm = fastbml.OGM({"audio": audio, "visual": visual}, alpha=0.8, seed=0)
        grads = [p.grad for group in ogm.params for p in group]
        saved = [g.to_local().clone() for g in grads]
        fsdp_bytes = sum(p.numel() * p.element_size() for m in (audio, visual)
                         for p in m.parameters())
        # the DDP-style comparison: whole gradients (gathered once here, outside any timing)
        whole = [[nn.Parameter(torch.empty(p.shape, device=device)) for p in group]
                 for group in ogm.params]
        whole_saved = [g.full_tensor() for g in grads]
        ddp_ogm = fastbml.OGM({"audio": whole[0], "visual": whole[1]}, alpha=0.8, seed=0)
        moments = torch.zeros(len(grads), 3, dtype=torch.float64, device=device)
        scores = torch.ones(2, device=device)
        shard_group = grads[0].device_mesh.get_group(0)

        def sharded():
            ogm.step(logits, y, epoch=0)

        def ddp_step():
            ddp_ogm.step(logits, y, epoch=0)

        def restore():
            torch._foreach_copy_([g.to_local() for g in grads], saved)
            for p, w in zip((p for group in whole for p in group), whole_saved):
                p.grad = w.clone()

        counter = CommCounter()
        with counter.installed():
            restore()
            sharded()  # first step: the ranks' agreement check
            ddp_step()
            counter.enabled = True
            sharded()
            counter.enabled = False
        calls, nbytes = dict(counter.calls), counter.bytes
        steps = [sharded, ddp_step]
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(args.steps):
            for j, fn in enumerate(steps):
                restore()
                dist.barrier()
                _sync(device)
                started = time.perf_counter()
                fn()
                _sync(device)
                times[j].append(time.perf_counter() - started)
        # the collectives alone: back to back (as a step issues them), so that the skew of the
        # ranks leaving a barrier does not count
        alone = []
        for payload, group in ((moments, shard_group), (scores, None)):
            dist.barrier()
            lat = []
            for _ in range(200):
                _sync(device)
                started = time.perf_counter()
                dist.all_reduce(payload, group=group)
                _sync(device)
                lat.append(time.perf_counter() - started)
            alone.append(lat[20:])
        times = [times[0], *alone, times[1]]  # VARIANTS order
        results[rank] = ("ok", {
            "tensors": len(grads), "calls": calls, "bytes": nbytes, "fsdp_bytes": fsdp_bytes,
            "local": sum(g.to_local().numel() for g in grads),
            "whole": sum(g.numel() for g in grads),
            "medians": [statistics.median(t[1:]) for t in times]})
    except BaseException as err:  # reported by the parent
        import traceback

        results[rank] = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _table(args, rows) -> str:
    first = rows[0]
    device = device_name(torch.device(args.device))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Sharded OGM-GE communication on {device}, {args.world} "
             f"{'nccl' if args.device.startswith('cuda') else 'gloo'} ranks, {when}", "",
             "```",
             f"two ResNet-18 encoders under fully_shard, {first['tensors']} modulated tensors "
             f"(weights with ndim >= 2), {first['whole'] / 1e6:.2f} M elements; rank 0 holds "
             f"{first['local'] / 1e6:.2f} M of them; batch {args.batch} per rank; medians of "
             f"{args.steps - 1} interleaved steps, ranks aligned by a barrier before each", "",
             f"sharded step, per step: {_calls(first['calls'])}, {first['bytes']} B "
             f"(the {first['tensors']} x 3 float64 moments: {24 * first['tensors']} B; the "
             "scores: 8 B)",
             f"FSDP's own gradient reduce-scatter per step: {first['fsdp_bytes'] / 1e6:.1f} MB "
             f"of gradients (moments: {24 * first['tensors'] / first['fsdp_bytes']:.1e} of it)",
             "", f"{'':44s}" + "".join(f"{'rank ' + str(r) + ' ms':>12s}" for r in
                                        range(len(rows))),
             "-" * (44 + 12 * len(rows))]
    for j, name in enumerate(VARIANTS):
        lines.append(f"{name:44s}" + "".join(f"{r['medians'][j] * 1e3:12.3f}" for r in rows))
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--batch", type=int, default=2, help="batch per rank (default 2)")
    parser.add_argument("--steps", type=int, default=41, help="timed steps (default 41)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(_rank_job, args=(args.world, os.path.join(tmp, "init"), args, results),
                           nprocs=args.world, start_method="spawn")
        rows = []
        for rank in range(args.world):
            status, value = results[rank]
            if status != "ok":
                raise SystemExit(f"rank {rank} failed:\n{value}")
            rows.append(value)
    write_table(f"{device_name(torch.device(args.device))}-fsdp-comm.md", _table(args, rows))


if __name__ == "__main__":
    main()
