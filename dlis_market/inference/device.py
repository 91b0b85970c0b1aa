"""Which device a stage runs on, and moving a loaded model there.

Named devices are resolved before anything loads, so ``--device cuda`` on a machine without one
fails at once with what to do; a ``torch.device`` is taken as it is (tests run stages on
``meta``). Moving keeps meta tensors meta and tied tensors tied. What a stage does on its device
is :mod:`dlis_market.inference.stage`'s docstring.
"""

from __future__ import annotations

import torch
from torch import nn

from dlis_market.errors import InferenceError

DEVICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(InferenceError):
    """The device asked for (``--device cuda``) is not on this machine, or is not a known name."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda if torch sees a CUDA device, else cpu; ``cpu``; ``cuda`` (the current CUDA device).

    A ``torch.device`` is taken as it is (tests run stages on ``meta``). Any other name, or
    ``cuda`` on a machine without one, raises :class:`DeviceUnavailableError` before anything loads.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine "
                f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); use --device cpu (or auto), "
                "or run on a machine with an NVIDIA GPU and a CUDA build of torch"
            )
        return torch.device("cuda", torch.cuda.current_device())
    raise DeviceUnavailableError(
        f"--device {device!r} is not a device a stage runs on; use one of {', '.join(DEVICES)}"
    )


def move_to(model: nn.Module, device: torch.device) -> None:
    """Move the loaded parameters and the buffers of ``model`` to ``device``, in place.

    Meta tensors (the layers and pieces this stage does not hold) stay meta. A tensor shared by
    two modules (a head tied to the embeddings) stays one tensor. bitsandbytes weights are on the
    device already (:func:`install_quantized`).
    """
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or tensor.is_meta or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    copy = tensor.detach().to(device)
                    is_param = isinstance(tensor, nn.Parameter)
                    moved[id(tensor)] = nn.Parameter(copy, requires_grad=False) if is_param else copy
                store[key] = moved[id(tensor)]  # type: ignore[assignment]
