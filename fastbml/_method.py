"""What the per-step balancing helpers (OGM, OPM, ...) share: their modalities, epoch window,
kernel backend, process group, seed and device step counter, the cross-rank configuration
check, and the ordering of per-modality inputs (docs/design.md#distributed-training)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from . import distributed, rng
from ._checks import integer


class MethodScaffold:
    """Mixin: call `_setup` from `__init__`, create the int64 device counter `self._step`, and
    define `_config()` (what every rank must agree on)."""

    _step: torch.Tensor

    def _setup(self, modalities: Sequence[str], *, start: int, end: int | None,
               warmup_epochs: int, seed: int | None, backend: str,
               process_group: object) -> None:
        names = list(modalities)
        if len(names) < 2 or len(set(names)) != len(names) or not all(
                isinstance(n, str) for n in names):
            raise ValueError(f"modalities must hold at least two distinct names, got {names!r}")
        for name, value in (("start", start), ("warmup_epochs", warmup_epochs)):
            integer(value, name)
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < start):
            raise ValueError(f"end must be None or an int >= start ({start}), got {end!r}")
        self.modalities = names
        self.start, self.end, self.warmup_epochs = start, end, warmup_epochs
        self.backend = backend
        self.group = distributed.resolve_group(process_group)
        self.seed = (rng.check_seed(seed) if seed is not None
                     else distributed.shared_seed(rng.fresh_seed(), self.group))
        self._rank = dist.get_rank(self.group) if self.group is not None else 0
        self._checked = False

    def in_window(self, epoch: int) -> bool:
        """Whether `epoch` (0-based) lies in start <= epoch <= end and epoch >= warmup_epochs."""
        return (epoch >= max(self.start, self.warmup_epochs)
                and (self.end is None or epoch <= self.end))

    @property
    def steps(self) -> int:
        """Steps taken so far (reads the device counter: a host sync on CUDA)."""
        return int(self._step)

    def _config(self) -> dict:
        raise NotImplementedError

    def _check_ranks(self) -> None:
        """Under DDP, every rank must agree on the configuration and the seed: checked at
        construction and again at the first eager step after loading a state dict."""
        if self.group is None:
            self._checked = True
        elif not self._checked and not torch.compiler.is_compiling():
            distributed.check_same_on_all_ranks(self._config(), self.group,
                                                f"fastbml.{type(self).__name__}")
            self._checked = True

    def _ordered(self, values: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                 name: str) -> list[torch.Tensor]:
        """Per-modality `values` (keyed by modality, or a sequence in modality order) as a list
        in modality order."""
        if isinstance(values, Mapping):
            if set(values) != set(self.modalities):
                raise ValueError(f"{name} keys {sorted(values)} do not match the modalities "
                                 f"{sorted(self.modalities)}")
            return [values[m] for m in self.modalities]
        if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a mapping keyed by modality or a sequence of tensors")
        if len(values) != len(self.modalities):
            raise ValueError(f"got {name} for {len(values)} modalities, expected "
                             f"{len(self.modalities)} ({', '.join(self.modalities)})")
        return list(values)

    def _counters(self) -> dict:
        return {"seed": self.seed, "steps": self.steps}

    def _load_counters(self, state: Mapping) -> None:
        self.seed = rng.check_seed(state["seed"])
        self._step.fill_(int(state["steps"]))
        self._checked = self.group is None
