"""Host staging buffers for async saves, reused across saves, and the fence of deferred copies.

``HostStager`` copies each tensor a rank writes into a host buffer it allocates once per
(fqn, chunk offset, shape, dtype) and keeps for every later save: pinned memory and
``non_blocking`` copies on a side stream for CUDA sources, a plain ``copy_`` on CPU. Copies
may be deferred: the persist thread makes them while the caller computes its next
forward/backward, and ``StagingFence.wait`` (before ``optimizer.step``) is where the caller
blocks, if at all.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch


class HostStager:
    """Host buffers for staging, allocated once per key and reused by every later save.

    Pinned when the source is on CUDA (copies ``non_blocking`` on a side stream); a plain
    ``copy_`` into the reused buffer on CPU. Buffers a save did not use are dropped at the end
    of it, so staging holds one copy of the rank's current state.

    A ``stage(..., defer=True)`` copy is not made before ``finish_stage`` returns: on CPU the
    persist thread makes it (``copy_deferred``) while the caller computes; on CUDA it is queued
    on the side stream and ``StagingFence.wait`` makes the caller's stream wait for it. Either
    way the caller must not change a deferred source before ``StagingFence.wait`` returns."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._used: set[tuple] = set()
        self._stream: Any = None
        self._pending_cuda = False
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._cuda_done: Any = None  # the side stream's event after every copy of this save

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def begin(self) -> None:
        self._used = set()
        self._pending_cuda = False
        self._deferred = []
        self._cuda_done = None

    def stage(self, fqn: str, offsets: tuple[int, ...], src: torch.Tensor, *,
              defer: bool = False) -> torch.Tensor:
        src = src.detach()
        cuda = src.device.type == "cuda"
        key = (fqn, offsets, tuple(src.shape), src.dtype, cuda)
        buf = self.buffers.get(key)
        if buf is None:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=cuda)
            self.buffers[key] = buf
        self._used.add(key)
        if defer:
            self._deferred.append((buf, src))
        elif cuda:
            self._copy_on_side_stream(buf, src)
        else:
            _copy(buf, src)
        return buf

    def _copy_on_side_stream(self, buf: torch.Tensor, src: torch.Tensor) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=src.device)
        if not self._pending_cuda:
            self._stream.wait_stream(torch.cuda.current_stream(src.device))
            self._pending_cuda = True
        with torch.cuda.stream(self._stream):
            buf.copy_(src, non_blocking=True)
        src.record_stream(self._stream)  # its memory is not reused before the copy ran

    def finish_stage(self) -> None:
        """Every non-deferred copy is complete (CUDA: synchronized) when this returns; CUDA
        copies that were deferred are queued behind them."""
        if self._pending_cuda:
            self._stream.synchronize()
            self._pending_cuda = False
        cuda = [(b, s) for b, s in self._deferred if s.device.type == "cuda"]
        if cuda:
            for buf, src in cuda:
                self._copy_on_side_stream(buf, src)
            self._cuda_done = torch.cuda.Event(blocking=True)  # the persist thread sleeps
            self._cuda_done.record(self._stream)
            self._pending_cuda = False
        self._deferred = [(b, s) for b, s in self._deferred if s.device.type != "cuda"]
        for key in [k for k in self.buffers if k not in self._used]:
            del self.buffers[key]

    def copy_deferred(self) -> None:
        """Persist thread: make the deferred copies (CPU), wait for the queued ones (CUDA)."""
        deferred, self._deferred = self._deferred, []
        for buf, src in deferred:
            _copy(buf, src)
        if self._cuda_done is not None:
            self._cuda_done.synchronize()

    def fence(self) -> "StagingFence":
        """The fence of this save's deferred copies (built by ``finish_stage``'s caller)."""
        return StagingFence(deferred=bool(self._deferred), cuda_event=self._cuda_done,
                            cuda_device=self._stream.device if self._cuda_done else None)


def _copy(buf: torch.Tensor, src: torch.Tensor) -> None:
    buf.copy_(src if src.device.type == "cpu" else src.to("cpu"))


class StagingFence:
    """Set once every deferred copy of one save is in its host buffer (or failed trying)."""

    def __init__(self, deferred: bool = False, cuda_event: Any = None,
                 cuda_device: Any = None) -> None:
        self._event = threading.Event()
        if not deferred:  # (CPU copies; deferred CUDA copies are ordered by stream events)
            self._event.set()
        self._cuda_event, self._cuda_device = cuda_event, cuda_device
        self.copy_s = 0.0
        """Seconds the persist thread spent on the deferred copies."""
        self.waited_s = 0.0
        """Seconds callers were blocked in ``wait``, in total."""

    def release(self, copy_s: float = 0.0) -> None:
        self.copy_s = copy_s
        self._event.set()

    def wait(self, timeout: float | None = None) -> float:
        """Block until the deferred copies are made; returns the seconds blocked. Deferred
        CUDA copies cost no host wait: the caller's current stream is ordered after them."""
        start = time.perf_counter()
        if self._cuda_event is not None:
            torch.cuda.current_stream(self._cuda_device).wait_event(self._cuda_event)
            self._cuda_event = None
        if not self._event.wait(timeout):
            raise TimeoutError(f"deferred staging copies not made within {timeout} s")
        blocked = time.perf_counter() - start
        self.waited_s += blocked
        return blocked
