"""One place that decides the torch device and CPU threads.

On CPU, torch's OpenMP threads spin while they wait for each other; on a small machine whose other
cores are busy (a napari GUI thread, a second job, a CI neighbour) two threads ran a ViT training step
12× *slower* than one (1.5 s vs 0.12 s, measured on the 2-core development machine). So we use half
the cores by default (at least one); ``SMSDL_NUM_THREADS`` overrides it.
"""

from __future__ import annotations

import os

_configured = False


def configure_threads() -> int:
    """Set torch's intra-op thread count once per process; return it."""
    global _configured
    import torch

    if not _configured:
        wanted = os.environ.get("SMSDL_NUM_THREADS")
        n = int(wanted) if wanted else max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(n)
        _configured = True
    return torch.get_num_threads()


def get_device(device: str = "auto"):
    """``"auto"`` → CUDA when available, else CPU (threads configured); or the named device."""
    import torch

    from .errors import InputError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown torch device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was asked for but no GPU is available (use --device cpu or auto)")
    if dev.type == "cpu":
        configure_threads()
    return dev
