"""Host-side helpers shared by the launchers: element types and small index tables on device."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_TABLES = 256


def device_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """An int64 [rows, cols] table on `device` (kernels address tensors through such tables of
    pointers and lengths). Tables are cached by content: the same set of tensors (a training
    loop's gradients, every step) reuses one table, so nothing is built or copied on the host
    after the first step, and a CUDA graph that captured the launch stays valid. The tables are
    read-only. A new table is copied to CUDA from pinned memory without a host sync."""
    key = (device, tuple(map(tuple, rows)))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    _TABLES[key] = table
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return table
