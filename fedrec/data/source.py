"""Resolve a run config to its event stream: a data file, or the embedded synthetic world."""

from __future__ import annotations

from functools import lru_cache

from ..config import RunConfig
from .events import EventLog
from .features import ItemFeatures, item_features
from .loaders import load_events
from .stream import RoundStream
from .world import WorldSpec, make_world


def world_spec(cfg: RunConfig) -> WorldSpec:
    return WorldSpec(users=cfg.world_users, items=cfg.world_items, topics=cfg.world_topics,
                     events_per_user=cfg.world_events_per_user, horizon=float(cfg.rounds), seed=cfg.seed,
                     shift_share=cfg.world_shift_share, shift_time=cfg.world_shift_time,
                     new_item_share=cfg.world_new_item_share, bursts=cfg.world_bursts,
                     burst_time=cfg.world_burst_time)


def load_stream(cfg: RunConfig) -> RoundStream:
    """The run's events cut into rounds (cached per process: every node of a simulation asks)."""
    return _load(cfg.data, world_spec(cfg) if not cfg.data else None, cfg.rounds, cfg.round_split)


@lru_cache(maxsize=4)
def _load(data: str, spec: WorldSpec | None, rounds: int, split: str) -> RoundStream:
    log = load_events(data) if data else make_world(spec)  # type: ignore[arg-type]
    return RoundStream.build(log, rounds, split)


def load_features(cfg: RunConfig, log: EventLog) -> ItemFeatures | None:
    """The run's public item features (``item-features``), or None; DataError on a bad file."""
    return item_features(cfg.item_features, cfg.data, log, cfg.world_feature_noise, cfg.seed)
