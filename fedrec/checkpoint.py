"""The server's checkpoint after each round: global model, server-optimizer and lr-schedule state.

One ``.npz`` file, replaced atomically (temp file + ``os.replace``) so a crash leaves the previous
round's checkpoint whole. Keys: ``round``; ``global:<name>`` per global parameter; ``opt:<key>``
for the server optimizer (its name, step count, and ``m``/``v`` moments of the adaptive ones);
``lr:<key>`` for the learning-rate schedule. The privacy ledger is its own append-only file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: str | Path, *, round_: int, global_state: dict[str, torch.Tensor], optimizer: dict,
                    lr_schedule: dict) -> None:
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"round": np.asarray(round_)}
    arrays.update({f"global:{k}": v.detach().cpu().numpy() for k, v in global_state.items()})
    for k, v in optimizer.items():
        arrays[f"opt:{k}"] = np.asarray(v)
    arrays["lr"] = np.asarray(json.dumps(lr_schedule))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """``{"round", "global": {name: array}, "optimizer": {...}, "lr_schedule": {...}}``."""
    with np.load(path, allow_pickle=False) as z:
        out = {"round": int(z["round"]), "global": {}, "optimizer": {}, "lr_schedule": json.loads(str(z["lr"]))}
        for k in z.files:
            if k.startswith("global:"):
                out["global"][k[7:]] = z[k]
            elif k.startswith("opt:"):
                v = z[k]
                out["optimizer"][k[4:]] = v.item() if v.ndim == 0 else v
    return out
