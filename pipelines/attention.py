"""Attention backend selection for adapter forward passes.

``sdpa`` (default) lets PyTorch's scaled-dot-product attention pick its kernel; diffusers'
optimisation guide recommends it over xformers on PyTorch 2. ``flash`` and ``math``
restrict SDPA to one kernel (flash for speed on sm80+ GPUs, math for bit-exact debugging);
``xformers`` switches the denoiser's attention processors to xformers' memory-efficient
kernel. A request that cannot be honoured raises :class:`AttentionBackendError` saying what to
install or which backend to use instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch

BACKENDS = ("sdpa", "xformers", "flash", "math")


class AttentionBackendError(RuntimeError):
    """The requested attention backend is not usable on this device / install."""


def check_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise :class:`AttentionBackendError` unless ``name`` can run on ``device`` in ``dtype``."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise AttentionBackendError(
                "attention 'xformers' requested but xformers is not installed: "
                "pip install 'imgalign[xformers]', or use --attention sdpa"
            )
        if device.type != "cuda":
            raise AttentionBackendError(
                f"attention 'xformers' needs a CUDA device (got {device.type}); use --attention sdpa"
            )
    if name == "flash":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise AttentionBackendError(
                f"attention 'flash' needs a CUDA GPU (got {device.type}); use --attention sdpa"
            )
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise AttentionBackendError(
                "attention 'flash' needs an sm80+ GPU (Ampere or newer); use --attention sdpa or xformers"
            )
        if dtype not in (torch.float16, torch.bfloat16):
            raise AttentionBackendError(
                f"attention 'flash' needs float16 or bfloat16 weights (got {dtype}); "
                "pass --dtype bf16, or use --attention sdpa"
            )


def apply_backend(model: torch.nn.Module, name: str) -> None:
    """Set the model's attention processors for ``name`` (only xformers changes processors)."""
    if name == "xformers":
        model.enable_xformers_memory_efficient_attention()
    elif getattr(model, "_imgalign_xformers", False):
        model.disable_xformers_memory_efficient_attention()
    model._imgalign_xformers = name == "xformers"


@contextlib.contextmanager
def attention_context(name: str) -> Iterator[None]:
    """Context for a forward pass: restricts SDPA's kernel choice for ``flash`` and ``math``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "flash":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            yield
    elif name == "math":
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    else:
        yield
