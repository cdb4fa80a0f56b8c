"""GPU test checks shared by the plugin test folders (used only by @pytest.mark.gpu tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside, any host-device synchronisation raises (``torch.cuda.set_sync_debug_mode("error")``)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def poison_allocator() -> None:
    """Leave garbage in the caching allocator's free blocks (small and large pools), so
    that an output slot the kernels do not write shows up as a mismatch."""
    junk = [torch.empty(1 << 18, dtype=torch.int32, device="cuda") for _ in range(64)]  # 1 MiB: small pool
    junk += [torch.empty(1 << 22, dtype=torch.int32, device="cuda") for _ in range(4)]  # 16 MiB: large pool
    for t in junk:
        t.fill_(0x5A5A5A5A)
    del junk
