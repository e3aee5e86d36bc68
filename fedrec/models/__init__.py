"""fedrec's recommenders: each declares its global and its local (on-device) parameters.

* ``mf``: matrix factorisation (:class:`~fedrec.models.mf.MF`), user vector local; trains in
  closed form (``update-backend = "auto"``).
* ``neumf``: neural matrix factorisation (:class:`~fedrec.models.neumf.NeuMF`), GMF + MLP towers,
  user embedding local.
* ``sasrec``: a self-attentive sequential recommender (:class:`~fedrec.models.sasrec.SASRec`);
  the user state is the device's own recent item sequence, kept on the device.
* ``deepfm``: DeepFM (:class:`~fedrec.models.deepfm.DeepFM`) over the user vector (local), the item id and
  the item's public features and age (published with every global version: :func:`version_features`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import registry
from ..data.features import published_features
from ..itemgraph import MODEL_FEATURES
from .base import BPRLoss, RecModel
from .deepfm import DeepFM
from .mf import MF
from .neumf import NeuMF
from .sasrec import SASRec

#: the model names, in the order of :data:`fedrec.registry.MODELS` (which maps each to its class)
MODELS = registry.MODELS.names()

__all__ = ["MODELS", "MF", "NeuMF", "SASRec", "DeepFM", "BPRLoss", "RecModel", "build_model", "published_features"]


def reads_features(name: str) -> bool:
    """Whether the model ``name`` reads the run's public item features."""
    return bool(getattr(registry.MODELS.get(name), "uses_features", False))


def build_model(name: str, n_items: int, dim: int, *, seed: int = 0, init_scale: float = 0.1,
                seq_len: int = 20, features: np.ndarray | None = None) -> RecModel:
    """Construct a model by name with a seeded initialisation (same arguments, same parameters); ``features``:
    the public item features as published (:func:`published_features`), for a model that reads them."""
    cls = registry.MODELS.get(name)
    extra: dict[str, Any] = {"seq_len": seq_len} if cls is SASRec else {}  # the one model that reads sequences
    if reads_features(name):
        extra["features"] = features
    model: RecModel = cls(n_items, dim, generator=torch.Generator().manual_seed(seed), init_scale=init_scale, **extra)
    return model


def model_from_config(cfg, n_items: int, features: np.ndarray | None = None) -> RecModel:
    """The model a run config names (``model``, ``dim``, ``seq-len``, ``init-scale``, ``seed``)."""
    return build_model(cfg.model, n_items, cfg.dim, seed=cfg.seed, init_scale=cfg.init_scale, seq_len=cfg.seq_len,
                       features=features)


def version_features(name: str, version: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The item features a global version carries for the model ``name`` (None: it reads none, or none sent)."""
    return np.asarray(version[MODEL_FEATURES]) if reads_features(name) and MODEL_FEATURES in version else None
