"""fedrec's recommenders: each declares its global and its local (on-device) parameters.

* ``mf``: matrix factorisation (:class:`~fedrec.models.mf.MF`), user vector local; trains in
  closed form (``update-backend = "auto"``).
* ``neumf``: neural matrix factorisation (:class:`~fedrec.models.neumf.NeuMF`), GMF + MLP towers,
  user embedding local.
* ``sasrec``: a self-attentive sequential recommender (:class:`~fedrec.models.sasrec.SASRec`);
  the user state is the device's own recent item sequence, kept on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import registry
from .base import BPRLoss, RecModel
from .mf import MF
from .neumf import NeuMF
from .sasrec import SASRec

#: the model names, in the order of :data:`fedrec.registry.MODELS` (which maps each to its class)
MODELS = registry.MODELS.names()

__all__ = ["MODELS", "MF", "NeuMF", "SASRec", "BPRLoss", "RecModel", "build_model"]


def build_model(name: str, n_items: int, dim: int, *, seed: int = 0, init_scale: float = 0.1,
                seq_len: int = 20) -> RecModel:
    """Construct a model by name with a seeded initialisation (same arguments, same parameters)."""
    cls = registry.MODELS.get(name)
    extra: dict[str, Any] = {"seq_len": seq_len} if cls is SASRec else {}  # the one model that reads sequences
    model: RecModel = cls(n_items, dim, generator=torch.Generator().manual_seed(seed), init_scale=init_scale, **extra)
    return model


def model_from_config(cfg, n_items: int) -> RecModel:
    """The model a run config names (``model``, ``dim``, ``seq-len``, ``init-scale``, ``seed``)."""
    return build_model(cfg.model, n_items, cfg.dim, seed=cfg.seed, init_scale=cfg.init_scale, seq_len=cfg.seq_len)
