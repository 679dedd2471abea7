"""In-place weight updates from a local safetensors file/directory or a dict of tensors.

Everything is checked before anything is copied: an unknown name, a wrong shape or an
unreadable file refuses the whole update and leaves the model as it was. A subset of the
parameters is allowed (SGLang's update_weights_from_tensor updates a few at a time).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from schedscope.engine.control_errors import WeightsMismatchError

WeightSource = str | Path | Mapping[str, torch.Tensor]


def describe(source: WeightSource) -> str:
    if isinstance(source, Mapping):
        return f"<{len(source)} tensors>"
    return str(source)


def load_tensors(source: WeightSource) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsMismatchError(f"not tensors: {bad[:3]}")
        return dict(source)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsMismatchError(f"no *.safetensors files in directory {path}")
    elif path.is_file():
        files = [path]
    else:
        raise WeightsMismatchError(f"weights path {path} does not exist")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            out.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsMismatchError(f"cannot read {file}: {exc}") from None
    if not out:
        raise WeightsMismatchError(f"{path} holds no tensors")
    return out


def check_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise WeightsMismatchError(
            f"{len(unknown)} tensor names the model does not have, e.g. {unknown[:3]}"
        )
    wrong = [
        f"{name}: got {tuple(t.shape)}, model has {tuple(params[name].shape)}"
        for name, t in tensors.items()
        if tuple(t.shape) != tuple(params[name].shape)
    ]
    if wrong:
        raise WeightsMismatchError(f"shape mismatch in {len(wrong)} tensors: {wrong[:3]}")
    not_float = [n for n, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise WeightsMismatchError(f"non-floating-point tensors: {not_float[:3]}")


@torch.no_grad()
def apply_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy into the existing parameters (same storage: nothing else needs rewiring)."""
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
    return len(tensors)
