"""Safetensors-only persistence: nested state (tensors + JSON) in one file, written atomically."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class DiskFull(OSError):
    """No room for a file: the message names it, what it needs, what is free, and what is kept."""

    def __init__(self, path: Path, needed: int) -> None:
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        super().__init__(
            errno.ENOSPC,
            f"no space left to write {path}: it needs {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free "
            f"there; {kept}. Free some space and resume",
        )


def _pack(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _pack(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        # Optimizer state is keyed by int parameter ids, which JSON objects cannot keep.
        return {"__items__": [[k, _pack(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_pack(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            raise DiskFull(path, sum(t.numel() * t.element_size() for t in tensors.values())) from None
        raise
    os.replace(tmp, path)  # a reader (or a resume after SIGKILL) sees the old file or the new one


def save_state(state: dict, path: str | Path) -> None:
    """Any nest of dicts/lists/tensors/JSON scalars -> one .safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, "s", tensors)
    _atomic_save(tensors, Path(path), {"state": json.dumps(skeleton)})


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict:
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        skeleton = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return _unpack(skeleton, tensors)


def save_weights(model: torch.nn.Module, path: str | Path, info: dict) -> None:
    """A student's weights as a plain state dict, with `info` (JSON) in the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_save(tensors, Path(path), {"info": json.dumps(info)})


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors, info
