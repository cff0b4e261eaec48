"""Host-side helpers shared by the launchers: element types and small index tables on device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def device_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """An int64 [rows, cols] table on `device`; on CUDA copied from pinned memory without a
    host sync (kernels address tensors through such tables of pointers and lengths)."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table
