"""The server's checkpoint after each round: global model, server-optimizer and lr-schedule state.

One ``.npz`` file, replaced atomically (temp file, fsync, ``os.replace``: :mod:`fedrec.atomic`) so a
crash leaves the previous round's checkpoint whole. Keys: ``round``; ``global:<name>`` per global parameter; ``opt:<key>``
for the server optimizer (its name, step count, ``m``/``v`` moments of the adaptive ones, and ``rows:<table>``,
per-row averaging's tally);
``lr`` for the learning-rate schedule (JSON); ``run`` (JSON) for what a resumed server needs beyond
the model: the run's config, whether the run finished, and the recorder's state (rows written so
far, the devices scored each round, running counts); ``buf:<key>`` for the arrays of the updates
waiting in the async buffer (their fields are in ``run``); ``graph:<key>`` for the item graph's sums
and its published table (:class:`fedrec.itemgraph.ItemGraph`). The privacy ledger is its own
append-only file, written before each version is published, so it is never behind the checkpoint; ``run``
records how much of it the checkpoint covers (``ledger``: its records, bytes and the SHA-256 of those bytes,
:meth:`fedrec.privacy.ledger.Ledger.mark`), and a resume refuses a ledger that no longer starts with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names it."""


def save_checkpoint(path: str | Path, *, round_: int, global_state: dict[str, torch.Tensor], optimizer: dict,
                    lr_schedule: dict, run: dict | None = None, buffer: dict[str, np.ndarray] | None = None,
                    graph: dict[str, np.ndarray] | None = None, acked: dict[str, np.ndarray] | None = None) -> None:
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"round": np.asarray(round_)}
    arrays.update({f"global:{k}": v.detach().cpu().numpy() for k, v in global_state.items()})
    for k, v in optimizer.items():
        arrays[f"opt:{k}"] = np.asarray(v)
    arrays["lr"] = np.asarray(json.dumps(lr_schedule))
    arrays["run"] = np.asarray(json.dumps(run or {}))
    arrays.update({f"buf:{k}": v for k, v in (buffer or {}).items()})
    arrays.update({f"graph:{k}": np.asarray(v) for k, v in (graph or {}).items()})
    arrays.update({f"acked:{k}": np.asarray(v, np.int64) for k, v in (acked or {}).items()})
    write_atomic(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # mypy: **arrays as allow_pickle


def load_checkpoint(path: str | Path) -> dict:
    """``{"round", "global": {name: array}, "optimizer": {...}, "lr_schedule": {...}, "run": {...},
    "buffer": {key: array}, "graph": {key: array}, "acked": {"devices": ids, "rounds": rounds} or {}}``.

    A file that is not a whole checkpoint raises :class:`CheckpointError` naming it.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # OSError, BadZipFile, ValueError: all mean the same to the user
        raise CheckpointError(f"{path} is not a readable fedrec checkpoint ({e}).") from None
    with z:
        try:
            out = {"round": int(z["round"]), "global": {}, "optimizer": {}, "lr_schedule": json.loads(str(z["lr"])),
                   "run": json.loads(str(z["run"])) if "run" in z.files else {}, "buffer": {}, "graph": {},
                   "acked": {}}
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path} is not a whole fedrec checkpoint ({e}).") from None
        for k in z.files:
            if k.startswith("global:"):
                out["global"][k[7:]] = z[k]
            elif k.startswith("buf:"):
                out["buffer"][k[4:]] = z[k]
            elif k.startswith("graph:"):
                out["graph"][k[6:]] = z[k]
            elif k.startswith("acked:"):
                out["acked"][k[6:]] = z[k]
            elif k.startswith("opt:"):
                v = z[k]
                out["optimizer"][k[4:]] = v.item() if v.ndim == 0 else v
    acked = out["acked"]
    if acked and (set(acked) != {"devices", "rounds"} or any(a.ndim != 1 or a.dtype.kind not in "iu"
                                                              for a in acked.values())
                  or len(acked["devices"]) != len(acked["rounds"])):
        raise CheckpointError(f"{path} is not a whole fedrec checkpoint (its acknowledged updates are damaged).")
    return out
