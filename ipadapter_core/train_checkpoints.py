"""Adapter-only training checkpoints: ``step-00001000/ip_adapter.safetensors`` (the official flat layout, loadable as
it is by IPX Load IP-Adapter and by diffusers' load_ip_adapter: no conversion step) beside ``training_state.pt`` (the
optimiser, the gradient scaler, the step and the samples consumed: what resuming needs). No UNet is ever saved.
A checkpoint is written under a temporary name and renamed when complete, so a killed run never leaves half of one.
"""
import os
import re
import shutil
from pathlib import Path

import torch

from .errors import AdapterFileError
from .files import load_adapter_state_dict, save_adapter_safetensors

ADAPTER_FILE = "ip_adapter.safetensors"
STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(folder, state: dict, metadata: dict | None = None) -> Path:
    """Write ``state`` (AdapterTrainer.state_dict(), plus any extra JSON-like entries) as a checkpoint in
    ``folder``; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(state["step"])
    partial = folder / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_adapter_safetensors(state["adapter"], str(partial / ADAPTER_FILE), metadata)
    torch.save({k: v for k, v in state.items() if k != "adapter"}, partial / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def list_checkpoints(folder) -> list:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / ADAPTER_FILE).is_file()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(folder):
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path) -> dict:
    """The state saved by save_checkpoint, with the adapter in the flat official layout (float32 as saved)."""
    path = Path(path)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in the unpickler in many ways
        raise AdapterFileError(f"cannot read the training state {path / STATE_FILE}: {e}; resume from an older "
                               f"checkpoint or start again") from e
    state["adapter"] = load_adapter_state_dict(str(path / ADAPTER_FILE))
    return state


def prune_checkpoints(folder, keep: int) -> list:
    """Remove all but the ``keep`` newest checkpoints (keep <= 0 keeps all); returns the removed paths."""
    found = list_checkpoints(folder)
    removed = found[:-keep] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
