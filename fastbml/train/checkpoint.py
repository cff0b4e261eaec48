"""Checkpoint files of a run: atomic writes, SHA-256 sidecars, a previous copy, safe loading.

`save` writes `<name>.tmp`, its digest to `<name>.sha256`, and renames both into place; with
`previous` the file it replaces becomes `previous` (with its sidecar). `load` checks the
digest and reads with `torch.load(weights_only=True)`: a checkpoint can hold tensors, numbers,
strings and containers, never code. Every failure is a `CheckpointError` naming the file.

Sharded checkpoints (`fastbml train --fsdp`, docs/design.md#distributed-training) are
directories: `save_sharded` writes the tensors with `torch.distributed.checkpoint` (each rank
its shards), the host state as `state.pt` (a checkpoint as above) and the SHA-256 of every file
in `SHA256SUMS`, then renames the directory into place. `load_sharded` reads them back on any
number of ranks through a reader that unpickles only DCP's metadata classes and a planner that
reads non-tensor values with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

STATE = "state.pt"        # a sharded checkpoint's host state (epoch, history, config, ...)
MANIFEST = "SHA256SUMS"   # a sharded checkpoint's "<sha256>  <file>" lines


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or not one fastbml wrote; the message names the file."""


def sidecar(path: Path) -> Path:
    """Where the SHA-256 of `path` is kept."""
    return path.with_name(path.name + ".sha256")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def move(src: Path, dst: Path) -> None:
    """Rename checkpoint `src` (a file with its sidecar, or a sharded directory) to `dst`,
    replacing what `dst` held."""
    if src.is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)
        return
    if sidecar(src).is_file():
        os.replace(sidecar(src), sidecar(dst))
    os.replace(src, dst)


def save(state: dict, path: Path, previous: Path | None = None) -> None:
    """Write `state` to `path` atomically with its SHA-256 sidecar; the file it replaces (and
    its sidecar) becomes `previous` when given."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    digest_tmp = sidecar(tmp)
    digest_tmp.write_text(f"{_digest(tmp)}  {path.name}\n")
    if previous is not None and path.is_file():
        move(path, previous)
    os.replace(digest_tmp, sidecar(path))
    os.replace(tmp, path)


def verify(path: Path) -> None:
    """CheckpointError unless `path` exists and matches the SHA-256 in its sidecar."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check = sidecar(path)
    if not check.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {check.name}: not "
                              "written by this fastbml, or the run was interrupted while saving")
    expected = check.read_text().split()[:1]
    if expected != [_digest(path)]:
        raise CheckpointError(f"checkpoint {path} is damaged: its SHA-256 does not match "
                              f"{check.name} (truncated, or modified after it was written)")


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The verified contents of `path` (tensors, numbers, strings and containers only)."""
    verify(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors, refused globals, bad zip archives
        raise CheckpointError(f"checkpoint {path} cannot be read safely: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a "
                              "fastbml checkpoint")
    return state


# ---------------------------------------------------------------------- sharded (DCP)
def _rank_world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def save_sharded(tensors: dict, state: dict, path: Path, previous: Path | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
    """Collective: write `tensors` (state dicts whose DTensors each rank writes its shards of)
    with torch.distributed.checkpoint and rank 0's `state` into directory `path`, atomically;
    the directory it replaces becomes `previous` when given. The ranks must share a file
    system."""
    rank, world = _rank_world(group)
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier(group)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), process_group=group)
    digests = sharded_digests([tmp], group)
    if rank == 0:
        (tmp / MANIFEST).write_text("".join(f"{digest}  {Path(f).name}\n"
                                            for f, digest in sorted(digests.items())))
        save(state, tmp / STATE)
        if previous is not None and path.is_dir():
            move(path, previous)
        move(tmp, path)
    if world > 1:  # when save_sharded returns, the checkpoint is in place for every rank
        dist.barrier(group)


def sharded_digests(paths: list[Path], group: dist.ProcessGroup | None = None) -> dict[str, str]:
    """Collective: the SHA-256 of every file of the sharded checkpoints `paths` (those that
    exist), each rank hashing a share of the files; every rank gets them all."""
    rank, world = _rank_world(group)
    files = sorted(str(f) for p in paths if p.is_dir() for f in p.iterdir() if f.is_file())
    everyone = [{f: _digest(Path(f)) for f in files[rank::world]}]
    if world > 1:
        mine, everyone = everyone[0], [None] * world
        dist.all_gather_object(everyone, mine, group=group)
    return {k: v for part in everyone for k, v in part.items()}


def load_sharded_state(path: Path, digests: dict[str, str] | None = None) -> dict:
    """The host state of sharded checkpoint `path`, after checking every file's SHA-256
    (taken from `digests`, by file path, where `sharded_digests` computed them)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: not written by this "
                              "fastbml, or the run was interrupted while saving")
    listed = dict(reversed(line.split(maxsplit=1)) for line in
                  manifest.read_text().splitlines() if line.strip())
    if ".metadata" not in listed:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no .metadata")
    for name, digest in sorted(listed.items()):
        file = path / name
        if Path(name).name != name or not file.is_file() or (
                (digests or {}).get(str(file)) or _digest(file)) != digest:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing or does not "
                                  f"match its SHA-256 in {MANIFEST}")
    try:
        return load(path / STATE)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata`: its own classes, torch.Size, dtypes and paths, nothing else."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        found = None
        if module in self._MODULES and not name.startswith("__"):
            found = getattr(__import__(module, fromlist=[name]), name, None)
            found = found if isinstance(found, type) else None
        elif module == "torch" and (name == "Size"
                                    or isinstance(getattr(torch, name, None), torch.dtype)):
            found = getattr(torch, name)
        elif (module, name) in (("torch.serialization", "_get_layout"),
                                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                                ("collections", "OrderedDict")):
            found = super().find_class(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return found


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        with open(self._get_metadata_path(rank), "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading non-tensor values with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_sharded(tensors: dict, path: Path, group: dist.ProcessGroup | None = None) -> None:
    """Collective: fill `tensors` (state dicts of this run's layout, DTensors sharded on any
    number of ranks) in place from sharded checkpoint `path`. Without a process group it reads
    whole tensors (plain state dicts: a sharded run's model in one process)."""
    alone = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: we mean it
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(tensors, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner(),
                     process_group=group, no_dist=alone)
    except (Exception, CheckpointException) as exc:
        if isinstance(exc, CheckpointException):  # the ranks' failures, with tracebacks
            causes = {f"{type(e).__name__}: {e}" for e, _ in exc.failures.values()}
        else:
            causes = {f"{type(exc).__name__}: {exc}"}
        raise CheckpointError(f"checkpoint {path} cannot be read safely or does not fit this "
                              f"run: {'; '.join(sorted(causes))}") from None
