"""Server optimizers on the aggregated delta (Reddi et al., "Adaptive Federated Optimization", 2021).

The aggregate of the round (the weighted mean, or under user-level DP the noisy mean) is treated
as a pseudo-gradient ``d``; the server then steps:

* ``fedavg``:     ``x += lr * d``
* ``fedadagrad``: ``v += d^2;                                   x += lr * m / (sqrt(v) + tau)``
* ``fedadam``:    ``v = b2 v + (1 - b2) d^2;                    x += lr * m / (sqrt(v) + tau)``
* ``fedyogi``:    ``v = v - (1 - b2) d^2 sign(v - d^2);         x += lr * m / (sqrt(v) + tau)``

with ``m = b1 m + (1 - b1) d`` for the adaptive ones (no bias correction, as in the paper). Their
state (``m``, ``v``) lives on the aggregation device and goes into the run's checkpoint. The
adaptive ones take much smaller rates than FedAvg (the step is normalised): ``lr`` 0.01-0.1.
Post-processing of a DP release never costs privacy, so all of them are free under user-level DP.
"""

from __future__ import annotations

import numpy as np
import torch

from .registry import SERVER_OPTIMIZERS

SERVER_OPTS = SERVER_OPTIMIZERS.names()


class ServerOptimizer:
    """Applies one round's aggregated delta to the global state, in place."""

    def __init__(self, name: str = "fedavg", *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        SERVER_OPTIMIZERS.check(name)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("Server optimizer needs 0 <= beta1, beta2 < 1 and tau > 0.")
        self.name, self.beta1, self.beta2, self.tau = name, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        #: per item table, each row's summed weight of devices that had the item (per-row averaging's state)
        self.rows: dict[str, torch.Tensor] = {}
        self.steps = 0

    def row_tally(self, key: str, cover: torch.Tensor) -> torch.Tensor:
        """Adds this round's per-row weight ``cover`` (float64, one per row of table ``key``) to the run's and
        returns the run's (:func:`fedrec.aggregation.per_row_mean`)."""
        have = self.rows.get(key)
        self.rows[key] = cover.clone() if have is None else have + cover
        return self.rows[key]

    def step(self, state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], lr: float) -> float:
        """``state += update(delta)`` in place; returns the norm of the applied update."""
        self.steps += 1
        sq = 0.0
        for k, x in state.items():
            d = delta[k].to(x.device, x.dtype)
            if self.name == "fedavg":
                upd = d * lr
            else:
                m = self.m.setdefault(k, torch.zeros_like(x))
                v = self.v.setdefault(k, torch.zeros_like(x))
                m.mul_(self.beta1).add_(d, alpha=1 - self.beta1)
                d2 = d * d
                if self.name == "fedadagrad":
                    v.add_(d2)
                elif self.name == "fedadam":
                    v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)
                else:  # fedyogi
                    v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))
                upd = lr * m / (v.sqrt() + self.tau)
            x.add_(upd)
            sq += float(torch.linalg.vector_norm(upd).item()) ** 2
        return float(np.sqrt(sq))

    def state_dict(self) -> dict[str, np.ndarray | int | str]:
        out: dict = {"name": self.name, "steps": self.steps}
        for k, t in self.m.items():
            out[f"m:{k}"] = t.detach().cpu().numpy()
        for k, t in self.v.items():
            out[f"v:{k}"] = t.detach().cpu().numpy()
        for k, t in self.rows.items():
            out[f"rows:{k}"] = t.detach().cpu().numpy()
        return out

    def load_state_dict(self, d: dict, device: torch.device | str = "cpu") -> None:
        if str(d["name"]) != self.name:
            raise ValueError(f"Checkpoint holds {d['name']} state, not {self.name}.")
        self.steps = int(d["steps"])
        self.m = {k[2:]: torch.as_tensor(np.asarray(v)).to(device) for k, v in d.items() if k.startswith("m:")}
        self.v = {k[2:]: torch.as_tensor(np.asarray(v)).to(device) for k, v in d.items() if k.startswith("v:")}
        self.rows = {k[5:]: _tally(k[5:], v) for k, v in d.items() if k.startswith("rows:")}


def _tally(key: str, v) -> torch.Tensor:
    """A checkpoint's per-row tally of table ``key``: one finite, non-negative weight per row."""
    a = np.asarray(v)
    if a.ndim != 1 or a.dtype.kind not in "fiu" or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"its per-row tally of {key} is not one finite, non-negative weight per row")
    return torch.as_tensor(a.astype(np.float64))
