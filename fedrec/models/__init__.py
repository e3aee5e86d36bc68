"""fedrec's recommenders: each declares its global and its local (on-device) parameters.

* ``mf``: matrix factorisation (:class:`~fedrec.models.mf.MF`), user vector local; trains in
  closed form (``update-backend = "auto"``).
* ``neumf``: neural matrix factorisation (:class:`~fedrec.models.neumf.NeuMF`), GMF + MLP towers,
  user embedding local.
* ``sasrec``: a self-attentive sequential recommender (:class:`~fedrec.models.sasrec.SASRec`);
  the user state is the device's own recent item sequence, kept on the device.
"""

from __future__ import annotations

import torch

from .base import BPRLoss, RecModel
from .mf import MF
from .neumf import NeuMF
from .sasrec import SASRec

MODELS = ("mf", "neumf", "sasrec")

__all__ = ["MODELS", "MF", "NeuMF", "SASRec", "BPRLoss", "RecModel", "build_model"]


def build_model(name: str, n_items: int, dim: int, *, seed: int = 0, init_scale: float = 0.1,
                seq_len: int = 20) -> RecModel:
    """Construct a model by name with a seeded initialisation (same arguments, same parameters)."""
    g = torch.Generator().manual_seed(seed)
    if name == "mf":
        return MF(n_items, dim, generator=g, init_scale=init_scale)
    if name == "neumf":
        return NeuMF(n_items, dim, generator=g, init_scale=init_scale)
    if name == "sasrec":
        return SASRec(n_items, dim, seq_len=seq_len, generator=g, init_scale=init_scale)
    raise ValueError(f"Unknown model {name!r}; expected one of: {', '.join(MODELS)}.")


def model_from_config(cfg, n_items: int) -> RecModel:
    """The model a run config names (``model``, ``dim``, ``seq-len``, ``init-scale``, ``seed``)."""
    return build_model(cfg.model, n_items, cfg.dim, seed=cfg.seed, init_scale=cfg.init_scale, seq_len=cfg.seq_len)
