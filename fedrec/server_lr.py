"""Server learning-rate schedules: fixed, or adaptive from the aggregated prequential metrics.

The adaptive rule is the seed's feedback loop: when the round's prequential HR@K falls more than
``drop`` below its recent level (an exponential moving average), behaviour has drifted away from
the model, so the server takes bigger steps (``boost`` times, up to ``max_factor`` times the base
rate); otherwise the rate relaxes back towards the base. It reads only the summed evaluation
counts the devices already report (see docs/privacy.md: those counts are not covered by DP).
"""

from __future__ import annotations

from fedrec.eval.metrics import PrequentialCounts


class ServerLR:
    """Per-round server learning rate.

    Parameters
    ----------
    base : the fixed rate, and the rate the adaptive schedule starts from and relaxes to.
    adaptive : False gives ``base`` every round.
    drop, boost, max_factor, relax, alpha : the adaptive rule (see the module docstring);
        ``alpha`` is the weight of the newest round in the moving average.
    """

    def __init__(self, base: float, *, adaptive: bool = False, drop: float = 0.1, boost: float = 2.0,
                 max_factor: float = 4.0, relax: float = 0.5, alpha: float = 0.3) -> None:
        if not base > 0:
            raise ValueError("The server learning rate should be a positive value.")
        if not (0 < drop < 1 and boost >= 1 and max_factor >= 1 and 0 <= relax <= 1 and 0 < alpha <= 1):
            raise ValueError("Adaptive server lr needs 0<drop<1, boost>=1, max_factor>=1, 0<=relax<=1, 0<alpha<=1.")
        self.base, self.adaptive = base, adaptive
        self.drop, self.boost, self.max_factor, self.relax, self.alpha = drop, boost, max_factor, relax, alpha
        self.lr = base
        self.level: float | None = None  #: moving average of the round HR

    def step(self, counts: PrequentialCounts) -> float:
        """The rate for this round's aggregation, given the round's prequential counts."""
        if not self.adaptive or counts.n == 0:
            return self.lr
        hr = counts.hits / counts.n
        if self.level is not None and hr < (1 - self.drop) * self.level:
            self.lr = min(self.lr * self.boost, self.base * self.max_factor)
        else:
            self.lr = self.base + (self.lr - self.base) * self.relax
        self.level = hr if self.level is None else (1 - self.alpha) * self.level + self.alpha * hr
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "level": self.level}

    def load_state_dict(self, d: dict) -> None:
        self.lr, self.level = float(d["lr"]), d["level"]
