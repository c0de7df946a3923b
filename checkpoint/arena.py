"""Host buffers that a state dict is copied into, allocated once and reused for every snapshot.

Why: in this VM a fresh allocation faults every page, so ``clone()`` of 1 GiB takes ~3 s while ``copy_`` into
buffers that were already touched takes ~0.2 s (specs/checkpointing.md section 5). One buffer per tensor, not
one flat arena: per-tensor ``copy_`` measured faster, and safetensors refuses tensors that share storage.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

import torch


class HostArena:
    """name -> host tensor; a buffer is reallocated only when its shape or dtype changes."""

    def __init__(self, pin_memory: Optional[bool] = None):
        # pinned memory makes device->host copies asynchronous-capable; it needs a CUDA runtime
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0

    @property
    def buffers(self) -> Mapping[str, torch.Tensor]:
        return MappingProxyType(self._buffers)

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers.values())

    def copy_from(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Copy every tensor of ``state`` into its buffer; names no longer present are dropped."""
        for name in [name for name in self._buffers if name not in state]:
            del self._buffers[name]
        with torch.no_grad():
            for name, source in state.items():
                self._buffer_for(name, source).copy_(source.detach())
        return self.buffers

    def copy_version(self, version: int, fragments, trainer_state) -> bool:
        """The checkpoint engine's level-0 target: every version is copied (``buffers`` holds the newest)."""
        self.copy_from({fragment.key: fragment.tensor for fragment in fragments})
        return True

    def _buffer_for(self, name: str, source: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=self.pin_memory)
            self._buffers[name] = buffer
            self.allocations += 1
        return buffer
