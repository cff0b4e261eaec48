"""How a run is spread over processes: this process's device, the process group `torchrun`
describes, each rank's share of the data, and FSDP2's sharding of the model
(docs/design.md#distributed-training)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.data import DistributedSampler

from .. import rng
from ..models import MultimodalClassifier

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _local_rank() -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() % max(torch.cuda.device_count(), 1)


def resolve_device(device: str) -> torch.device:
    """The device of this process; under torch.distributed "auto" and "cuda" mean cuda:LOCAL_RANK."""
    ranked = dist.is_available() and dist.is_initialized()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and ranked and torch.cuda.is_available():
        device = f"cuda:{_local_rank()}"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def setup_distributed(device: str = "auto", backend: str = "auto", *,
                      single_process: bool = False) -> bool:
    """Join the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); True when this call created it.

    Nothing happens when a group is already initialised or the variables are absent (a plain
    single-process run), unless `single_process`: then a group of this one process is created
    (what FSDP2 runs on without torchrun). backend "auto" is nccl when this rank trains on CUDA,
    else gloo; on CUDA the process's device is set to cuda:LOCAL_RANK first. Any failure is a
    ValueError that says what to fix.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    present = [k for k in _TORCHRUN_ENV if k in os.environ]
    if "RANK" not in present and "WORLD_SIZE" not in present:
        if single_process:
            return _single_process_group(device, backend)
        return False
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"distributed launch: {', '.join(present)} set but {', '.join(missing)} "
                         "missing; launch with torchrun (it sets them all), or unset RANK and "
                         "WORLD_SIZE for a single-process run")
    if not dist.is_available():
        raise ValueError("distributed launch: this PyTorch build has no torch.distributed")
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as exc:
        raise ValueError(f"distributed launch: RANK, WORLD_SIZE, LOCAL_RANK must be integers "
                         f"({exc})") from None
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"distributed launch: device {device!r} but CUDA is not available")
        if device in ("auto", "cuda"):
            if local >= torch.cuda.device_count():
                raise ValueError(f"distributed launch: LOCAL_RANK {local} but this node has "
                                 f"{torch.cuda.device_count()} GPUs; use --nproc_per_node <= "
                                 "the number of GPUs")
            torch.cuda.set_device(local)
        else:
            torch.cuda.set_device(torch.device(device))
    elif backend == "nccl":
        raise ValueError("distributed launch: the nccl backend needs CUDA devices; use "
                         "--dist-backend gloo to train on CPU")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
    except Exception as exc:  # rendezvous errors come as RuntimeError, DistNetworkError, ...
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise ValueError(f"distributed launch: could not set up the {backend} process group "
                         f"(rank {rank} of {world}, master {where}): {type(exc).__name__}: "
                         f"{exc}") from exc
    return True


def _single_process_group(device: str, backend: str) -> bool:
    """A process group of this process alone (an in-memory store: no port, no environment)."""
    if not dist.is_available():
        raise ValueError("--fsdp: this PyTorch build has no torch.distributed")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("--fsdp: the nccl backend needs CUDA devices; use --dist-backend gloo "
                         "to train on CPU")
    if cuda and device not in ("auto", "cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


class ShardSampler(DistributedSampler):
    """This rank's share of the epoch's permutation, drawn from (seed, epoch) like the
    single-process loader: rank r takes positions r, r + W, ... of the permutation (padded by
    wrapping so every rank has the same number of batches). So step b's global batch is batch b
    of a single-process run with batch size W x batch_size, and no state but (seed, epoch)."""

    def __iter__(self):
        n = len(self.dataset)
        g = torch.Generator().manual_seed(rng.step_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g).tolist()
        if self.drop_last:
            order = order[:self.total_size]
        else:
            order += (order * (self.total_size // max(n, 1) + 1))[:self.total_size - n]
        return iter(order[self.rank:self.total_size:self.num_replicas])


def gather_rows(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Rows r, r + W, ... of an [n, ...] tensor live on rank r: all of it, in order, on every rank."""
    size = -(-n // world)
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[:local.shape[0]] = local
    everyone = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everyone, padded)
    out = local.new_empty((n, *local.shape[1:]))
    for r in range(world):
        out[r::world] = everyone[r][:len(range(r, n, world))]
    return out


def fsdp_mesh(device: torch.device, shard_size: int | None = None):
    """The default group's ranks as FSDP2's mesh: 1-D (shard over all), or with `shard_size`
    HSDP's 2-D (replicate, shard) mesh of world / shard_size groups of consecutive ranks."""
    world = dist.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device.type, (world,))
    if world % shard_size:
        raise ValueError(f"fsdp_shard_size {shard_size} must divide the world size {world}")
    return init_device_mesh(device.type, (world // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_model(model: MultimodalClassifier, device: torch.device,
                mixed_precision: str = "none", shard_size: int | None = None) -> None:
    """FSDP2 over the default group's ranks (docs/design.md#distributed-training): each encoder
    and the fusion head become a `fully_shard` unit, the model the root. Their parameters turn
    into DTensors sharded on dim 0 (over groups of `shard_size` ranks and replicated across
    them: HSDP); the units are all-gathered around their forward and their gradients
    reduce-scattered after backward. `encode` and the head's `unimodal_logits` are registered
    as forward methods, so the split forward the methods need (OPM between the encoders and the
    head) all-gathers like `forward`. mixed_precision "bf16": parameters are all-gathered and
    used in bf16, gradients reduced in fp32 (the shards stay fp32)."""
    mesh = fsdp_mesh(device, shard_size)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    for unit in [*model.encoders.values(), model.head, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "encode")
    register_fsdp_forward_method(model.head, "unimodal_logits")
