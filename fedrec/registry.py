"""Every choice a run config names, named once: models, aggregators, server optimizers, wire formats, ...

In the spirit of Opacus's ``accountants/registry.py``: each :class:`Registry` holds the names of one
kind of choice in a fixed order (the order help texts and error sentences list them in), and for
the choices that are objects (models, aggregators, accountants) a ``"module:attr"`` target that
:meth:`Registry.get` imports on first use. This module imports nothing of fedrec's and no third-party
package, so :mod:`fedrec.config` (which takes its choice lists from here) never pulls in torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


class Registry:
    """The names of one kind of choice, in a fixed order, each optionally bound to a lazy target.

    Parameters
    ----------
    kind:
        What a name names, in words ("model", "server optimizer"): it starts the error sentence.
    entries:
        Either the names alone, or ``name -> "module:attr"`` (``None`` for a name with no object).
    """

    def __init__(self, kind: str, entries: Mapping[str, str | None] | Sequence[str]) -> None:
        self.kind = kind
        self._targets: dict[str, str | None] = (
            dict(entries) if isinstance(entries, Mapping) else dict.fromkeys(entries))

    def names(self) -> tuple[str, ...]:
        """Every name, in the registry's fixed order."""
        return tuple(self._targets)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()!r})"

    def unknown(self, name: object) -> str:
        """The sentence for a name this registry does not hold."""
        return f"Unknown {self.kind} {name!r}; expected one of {', '.join(self._targets)}."

    def check(self, name: object) -> str:
        """``name`` itself if the registry holds it, else :class:`ValueError` with :meth:`unknown`'s sentence."""
        if name not in self:
            raise ValueError(self.unknown(name))
        return str(name)

    def get(self, name: str) -> Any:
        """The object ``name`` stands for, imported on first use.

        Raises :class:`ValueError` for an unknown name, and :class:`LookupError` for a name that is a
        plain choice with no object behind it.
        """
        target = self._targets.get(self.check(name))
        if target is None:
            raise LookupError(f"The {self.kind} {name!r} is a plain choice; no object stands for it.")
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


# ---- choices that are objects ------------------------------------------------------------------
MODELS = Registry("model", {
    "mf": "fedrec.models.mf:MF",
    "neumf": "fedrec.models.neumf:NeuMF",
    "sasrec": "fedrec.models.sasrec:SASRec",
    "deepfm": "fedrec.models.deepfm:DeepFM",
})
AGGREGATORS = Registry("aggregator", {
    "mean": "fedrec.aggregation:Mean",
    "trimmed-mean": "fedrec.aggregation:TrimmedMean",
    "median": "fedrec.aggregation:Median",
})
#: the accountants of a config's ``accountant`` key (Opacus's own classes)
ACCOUNTANTS = Registry("accountant", {
    "prv": "opacus.accountants:PRVAccountant",
    "rdp": "opacus.accountants:RDPAccountant",
})

# ---- choices that are modes of one piece of code -----------------------------------------------
#: :class:`fedrec.server_opt.ServerOptimizer` steps by name
SERVER_OPTIMIZERS = Registry("server optimizer", ("fedavg", "fedadagrad", "fedadam", "fedyogi"))
#: how a delta travels (:mod:`fedrec.wire`); ``auto`` picks one of the others by privacy unit
WIRES = Registry("wire format", ("auto", "dense", "fp16", "sparse"))
PRIVACY_MODES = Registry("privacy mode", ("none", "event", "user", "both"))
#: the privacy modes with event-level DP-SGD on the device, and those with user-level noise on the server
EVENT_DP_MODES = ("event", "both")
USER_DP_MODES = ("user", "both")
ENGINES = Registry("engine", ("ray", "local"))
METHODS = Registry("method", ("federated", "centralised"))
LR_SCHEDULES = Registry("lr schedule", ("fixed", "adaptive"))
ROUND_SPLITS = Registry("round split", ("count", "time"))
CLOCKS = Registry("clock", ("replay", "live"))
UPDATE_BACKENDS = Registry("update backend", ("auto", "autograd"))
#: when a simulation measures its baselines: in a process of their own as its rounds end, or after the rounds
#: (:mod:`fedrec.eval.alongside`); auto: alongside where it pays (:func:`fedrec.eval.alongside.wanted`)
BASELINE_TIMINGS = Registry("baselines timing", ("auto", "alongside", "after"))
#: the federated item graph (:mod:`fedrec.itemgraph`): auto = on without DP, off under any DP mode
ITEM_GRAPH_MODES = Registry("item graph mode", ("auto", "on", "off"))
#: where event-level DP noise is added: on each device (DP-SGD, protects against the server) or once to the
#: cohort's sum (trusts the server, or SecAgg+ with distributed noise shares): :mod:`fedrec.privacy.aggregate`;
#: auto: at the aggregate where the run allows it (:attr:`fedrec.config.RunConfig.aggregate_noise`), else on the device
EVENT_NOISE_MODES = Registry("event noise mode", ("auto", "device", "aggregate"))
