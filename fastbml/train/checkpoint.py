"""Checkpoint files of a run: atomic writes, SHA-256 sidecars, a previous copy, safe loading.

`save` writes `<name>.tmp`, its digest to `<name>.sha256`, and renames both into place; with
`keep_previous` the file it replaces becomes `<prev>` (with its sidecar). `load` checks the
digest and reads with `torch.load(weights_only=True)`: a checkpoint can hold tensors, numbers,
strings and containers, never code. Every failure is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


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


def save(state: dict, path: Path, previous: Path | None = None) -> None:
    """Write `state` to `path` atomically with its SHA-256 sidecar; the file it replaces (and
    its sidecar) becomes `previous` when given."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    digest_tmp = sidecar(tmp)
    digest_tmp.write_text(f"{_digest(tmp)}  {path.name}\n")
    if previous is not None and path.is_file():
        os.replace(path, previous)
        if sidecar(path).is_file():
            os.replace(sidecar(path), sidecar(previous))
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
