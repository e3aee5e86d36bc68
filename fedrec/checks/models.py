"""The contract every fedrec model keeps, as checks run over every model (like River's ``checks``).

``yield_checks(name)`` yields check functions ``check(name, tmp_dir)``; each raises
``AssertionError`` with a sentence when the model breaks the contract. ``tests/test_models_contract.py``
runs every check over every model in :data:`fedrec.models.MODELS`, so a new model is checked the
moment it is registered. The checks run the real code paths (``client_update``, the wire encoding,
the checkpoint file, the device SDK with its SQLite store), on small data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..client_update import DeviceState, client_update
from ..config import RunConfig
from ..itemgraph import MODEL_FEATURES
from ..models import build_model, model_from_config, published_features
from ..models.base import BPRLoss, RecModel
from ..registry import PRIVACY_MODES
from ..wire import encode_delta, wire_mode

N_ITEMS = 40
Check = Callable[[str, Path], None]


def _cfg(name: str, **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(model=name, dim=8, seq_len=6, local_steps=4, sample_rate=0.5, user_fit_steps=5, privacy="none",
                noise_multiplier=1.0, lr=0.5, seed=3)
    base.update(kw)
    return RunConfig(**base)


def _events(seed: int = 0, n: int = 30, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A device's events: items drawn from a small taste cluster, ``n`` events over ``rounds`` windows."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, N_ITEMS // 2, n).astype(np.int64)
    return items, np.repeat(np.arange(1, rounds + 1), int(np.ceil(n / rounds)))[:n]


def _features() -> np.ndarray:
    """Public item features for the models that read them: 6 features, 1 to 3 per item, as published."""
    rng = np.random.default_rng(7)
    x = np.zeros((N_ITEMS, 6), np.float32)
    for i in range(N_ITEMS):
        x[i, rng.choice(6, int(rng.integers(1, 4)), replace=False)] = 1.0
    return published_features(x / np.linalg.norm(x, axis=1, keepdims=True))


def _model(cfg: RunConfig) -> RecModel:
    return model_from_config(cfg, N_ITEMS, _features())


def _global(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.global_state().items()}


def _version(model: RecModel) -> dict[str, np.ndarray]:
    """A global version as the server sends it (with the item features, for a model that reads them)."""
    return _global(model) | ({MODEL_FEATURES: _features()} if model.uses_features else {})


def _update(name: str, cfg: RunConfig, state: DeviceState | None = None, round_: int = 3, seed: int = 0):
    model = _model(cfg)
    items, rounds = _events(seed)
    return client_update(model, _global(model), state or DeviceState(), items, rounds, round_, cfg, device_id=11,
                         noise_multiplier=cfg.noise_multiplier)


def check_partition(name: str, tmp: Path) -> None:
    """Global and local names partition the trainable parameters, and every one of them is used."""
    cfg = _cfg(name)
    model = _model(cfg)
    model.check_partition()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(model.global_names) | set(model.local_names) == names, f"{name}: the partition misses parameters"
    assert not set(model.global_names) & set(model.local_names), f"{name}: a parameter is both global and local"
    assert model.global_names, f"{name}: a model with nothing to share cannot be trained federatedly"
    items, rounds = _events()
    cand = torch.arange(N_ITEMS // 2, N_ITEMS)
    batch, weight = model.samples(items, rounds, np.ones(len(items), bool), cand, negatives=2,
                                  generator=torch.Generator().manual_seed(0), sessions=False)
    s = model(*batch)
    assert s.shape[0] == len(weight) and s.shape[-1] == 3, f"{name}: scores of shape {tuple(s.shape)}"
    diff = s[..., :1] - s[..., 1:]
    BPRLoss()(diff, weight).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not unused, f"{name}: parameters without a gradient (Opacus ghost clipping fails on them): {unused}"


def check_user_state_never_leaves(name: str, tmp: Path) -> None:
    """What a device sends holds exactly the global parameters; its local state stays in its state."""
    for privacy in ("none", "event", "user"):
        cfg = _cfg(name, privacy=privacy)
        res = _update(name, cfg)
        model = _model(cfg)
        assert set(res.delta) == set(model.global_names), f"{name}/{privacy}: sends {sorted(res.delta)}"
        for k, v in res.delta.items():
            assert v.shape == tuple(model.global_state()[k].shape), f"{name}/{privacy}: {k} has shape {v.shape}"
        sent = encode_delta(res.delta, wire_mode(cfg.wire, privacy))
        base = {k.rsplit(".ids", 1)[0].rsplit(".rows", 1)[0] for k in sent}
        assert base <= set(model.global_names), f"{name}/{privacy}: the wire carries {sorted(sent)}"
        assert set(res.state.local) == set(model.local_names), f"{name}/{privacy}: local state {sorted(res.state.local)}"
        raw = b"".join(np.ascontiguousarray(v).tobytes() for v in sent.values())
        for k, v in res.state.local.items():
            assert np.asarray(v, np.float32).tobytes() not in raw, f"{name}/{privacy}: {k} is inside what is sent"


def check_same_seed_same_result(name: str, tmp: Path) -> None:
    """Same seed, same model and same update; another seed, another model. Inputs are not mutated."""
    cfg = _cfg(name, privacy="event")
    a, b = _model(cfg), _model(cfg)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), f"{name}: two builds with seed {cfg.seed} differ in {k}"
    c = _model(dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True)), \
        f"{name}: the seed does not change the initialisation"
    items, rounds = _events()
    g = _global(a)
    g_copy = {k: v.copy() for k, v in g.items()}
    items_copy = items.copy()
    r1 = client_update(a, g, DeviceState(), items, rounds, 3, cfg, device_id=4, noise_multiplier=1.0)
    r2 = client_update(b, g, DeviceState(), items, rounds, 3, cfg, device_id=4, noise_multiplier=1.0)
    for k in r1.delta:
        assert np.array_equal(r1.delta[k], r2.delta[k]), f"{name}: the same update differs in {k}"
    assert all(np.array_equal(g[k], g_copy[k]) for k in g), f"{name}: client_update mutated the global state"
    assert np.array_equal(items, items_copy), f"{name}: client_update mutated the events"
    r3 = client_update(a, g, DeviceState(), items, rounds, 3, cfg, device_id=5, noise_multiplier=1.0)
    assert any(not np.array_equal(r1.delta[k], r3.delta[k]) for k in r1.delta), \
        f"{name}: two devices drew the same randomness"


def check_trains_under_every_privacy_mode(name: str, tmp: Path) -> None:
    """Each privacy mode trains (finite, nonzero delta), clips under user level, and accounts under event level."""
    for privacy in PRIVACY_MODES:
        cfg = _cfg(name, privacy=privacy, clip=0.5)
        res = _update(name, cfg)
        flat = np.concatenate([v.ravel() for v in res.delta.values()])
        assert np.isfinite(flat).all() and np.abs(flat).max() > 0, f"{name}/{privacy}: no update"
        assert res.steps == cfg.steps and res.n_train == len(_events()[0]), f"{name}/{privacy}: {res.steps} steps"
        if cfg.user_dp:
            assert np.linalg.norm(flat) <= 0.5 * (1 + 1e-5), f"{name}/{privacy}: delta norm {np.linalg.norm(flat)}"
        if cfg.event_dp:
            assert res.epsilon > 0 and res.state.max_exposure == cfg.steps, f"{name}/{privacy}: not accounted"
            again = client_update(_model(cfg), _global(_model(cfg)), res.state,
                                  *_events(), 3 + 1, cfg, device_id=11, noise_multiplier=1.0)
            # the device's state carries its exposure across rounds (a replayed window adds its steps)
            assert again.state.max_exposure == 2 * cfg.steps and again.epsilon > res.epsilon, \
                f"{name}/{privacy}: the exposure was forgotten between rounds"
        else:
            assert res.epsilon == 0.0


def check_save_load_round_trip(name: str, tmp: Path) -> None:
    """The global version survives the checkpoint file, the device state its config record; scores are equal."""
    from ..checkpoint import load_checkpoint, save_checkpoint

    cfg = _cfg(name)
    res = _update(name, cfg)
    model = _model(cfg)
    trained = {k: torch.from_numpy(np.asarray(model.global_state()[k].numpy() + res.delta[k])) for k in res.delta}
    save_checkpoint(tmp / "ck.npz", round_=3, global_state=trained, optimizer={}, lr_schedule={})
    loaded = load_checkpoint(tmp / "ck.npz")["global"]
    other = build_model(name, N_ITEMS, cfg.dim, seed=99, seq_len=cfg.seq_len, features=_features())  # different init, then loaded
    other.load({k: torch.as_tensor(np.asarray(v)) for k, v in loaded.items()})
    model.load(trained)
    state = DeviceState.from_config(res.state.to_config())
    for m in (model, other):
        m.load({k: torch.from_numpy(np.asarray(v)) for k, v in state.local.items()})
    hist = _events()[0]
    assert torch.equal(model.score_all(hist), other.score_all(hist)), f"{name}: scores differ after a reload"
    flat = model.local_flat()
    other.load_local_flat(flat)
    assert np.array_equal(other.local_flat(), flat), f"{name}: the flat local state does not round-trip"


def check_ranking_excludes_seen(name: str, tmp: Path) -> None:
    """On a device (SQLite store), recommendations never repeat what the user had; explanations come
    from the user's own history."""
    from ..clients.device import Device

    cfg = _cfg(name)
    model = _model(cfg)
    items, _ = _events()
    with Device(tmp / f"{name}.sqlite", create=True, device_id=2, n_items=N_ITEMS) as d:
        d.record_many([(int(i), float(t), "click", 1.0) for t, i in enumerate(items)])
        d.run_round(_version(model), cfg, 1, train=True)
        top = d.recommend(10)
        assert len(top) == 10 and len(set(top)) == 10, f"{name}: {top}"
        assert not set(top) & set(items.tolist()), f"{name}: recommends items the user had: {set(top) & set(items)}"
        why = d.recommend(10, explain=True)
        assert [r.item for r in why] == top, f"{name}: explain=True changes the ranking"
        for r in why:
            assert 1 <= len(r.because) <= 3 and all(h in set(items.tolist()) for h, _ in r.because), \
                f"{name}: the reasons for {r.item} are not from the user's history: {r.because}"
            sims = [s for _, s in r.because]
            assert sims == sorted(sims, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in sims)


def check_learns(name: str, tmp: Path) -> None:
    """Non-private local training raises the device's positives above the items it never had."""
    cfg = _cfg(name, local_steps=30, lr=1.0, sample_rate=1.0)
    model = _model(cfg)
    items, rounds = _events()
    g = _global(model)

    def gap(state) -> float:
        model.load({k: torch.from_numpy(v) for k, v in g.items()})
        if state.local:
            model.load({k: torch.from_numpy(np.asarray(v)) for k, v in state.local.items()})
        s = model.score_all(items).numpy()
        return float(s[np.unique(items)].mean() - s[N_ITEMS // 2:].mean())

    res = client_update(model, g, DeviceState(), items, rounds, 3, cfg, device_id=1, noise_multiplier=0.0)
    before = gap(res.state)
    g = {k: g[k] + res.delta[k] for k in g}
    after = gap(res.state)
    assert after > before + 0.05, f"{name}: training did not separate the user's items ({before:.3f} -> {after:.3f})"


def check_instant_state(name: str, tmp: Path) -> None:
    """Per-event scores (:meth:`RecModel.score_events`): row ``j`` reads the events before ``j`` only (a
    planted later event changes no earlier row), batched rows equal rows computed one prefix at a time,
    the inputs are not mutated, and the instant state follows the newest events (the row after them
    differs from the round-start row); the blocks of several devices scored together
    (:meth:`RecModel.score_event_blocks`) equal each block scored alone."""
    cfg = _cfg(name)
    model = _model(cfg)
    items, _ = _events()
    hist, new = items[:10].copy(), items[10:16].copy()
    vec = model.local_flat()
    rows = model.score_events(hist, new, vec, context=cfg.session_len)
    assert rows.shape == (len(new) + 1, N_ITEMS), f"{name}: score_events gave {tuple(rows.shape)}"
    planted = np.concatenate([new[:3], [N_ITEMS - 1], new[4:]])  # a different event at position 3
    other = model.score_events(hist, planted, vec, context=cfg.session_len)
    assert torch.allclose(rows[:4], other[:4], atol=1e-5), f"{name}: a row reads an event at or after its own"
    for j in (0, 3, len(new)):
        one = model.score_events(hist, new[:j], vec, context=cfg.session_len)[-1]
        assert torch.allclose(rows[j], one, atol=1e-4), f"{name}: row {j} differs when computed alone"
    assert hist.tolist() == items[:10].tolist() and new.tolist() == items[10:16].tolist(), f"{name}: inputs mutated"
    assert not torch.allclose(rows[0], rows[-1]), f"{name}: the instant state ignores the newest events"
    other_vec = model.local_flat() + 0.05 if len(vec) else vec  # a second device, with its own vector
    blocks = [(hist, new, vec), (items[:3], items[3:5], other_vec), (items[:0], items[:2], None), (hist, new[:0], vec)]
    together = model.score_event_blocks(blocks, context=cfg.session_len)
    alone = torch.cat([model.score_events(h, n, v, context=cfg.session_len) for h, n, v in blocks])
    assert torch.allclose(together, alone, atol=1e-4), f"{name}: blocks scored together differ from each alone"


def check_event_contexts(name: str, tmp: Path) -> None:
    """A model that reads each event's context (``reads_kinds``): a training sample carries the kind of the event
    before it (the first: none); the scores after a history read the kind of its last event; per-event row ``j``
    reads the kinds of the events before ``j`` only (the kind of event ``j`` itself is what happens, not what is
    known before it); blocks scored together keep their own kinds; and a device's update trains on them. A model
    that reads none scores the same whatever the kinds."""
    from ..models.base import NO_CONTEXT

    cfg = _cfg(name)
    model = _model(cfg)
    items, rounds = _events()
    kinds = (np.arange(len(items)) % 3 + 1).astype(np.int8)  # click, view, purchase in turn
    hist, new, kh, kn = items[:10], items[10:16], kinds[:10], kinds[10:16]
    vec = model.local_flat()
    rows = model.score_events(hist, new, vec, context=cfg.session_len, kinds=np.concatenate([kh, kn]))
    bought = kn.copy()
    bought[3] = 3 if kn[3] != 3 else 1  # event 3's own kind differs
    other = model.score_events(hist, new, vec, context=cfg.session_len, kinds=np.concatenate([kh, bought]))
    assert torch.allclose(rows[:4], other[:4], atol=1e-5), f"{name}: a row reads the kind of its own event or a later one"
    if not model.reads_kinds:
        assert torch.allclose(rows, other, atol=1e-6), f"{name}: scores read event kinds the model does not use"
        return
    assert not torch.allclose(rows[4], other[4], atol=1e-6), f"{name}: row 4 ignores the kind of the event before it"
    batch, _ = model.samples(items, rounds, rounds >= 2, torch.arange(N_ITEMS), negatives=2,
                             generator=torch.Generator().manual_seed(0), kinds=kinds)
    want = np.concatenate([[NO_CONTEXT], kinds[:-1]])[rounds >= 2]
    assert batch[-1].tolist() == want.tolist(), f"{name}: a sample's context is not the kind of the event before it"
    first = model.samples(items, rounds, rounds >= 1, torch.arange(N_ITEMS), negatives=2,
                          generator=torch.Generator().manual_seed(0))[0][-1]
    assert int(first[0]) == NO_CONTEXT and set(first.tolist()) == {NO_CONTEXT}, f"{name}: no kinds is not no context"
    after = [model.score_all(hist, np.concatenate([kh[:-1], [k]])) for k in (1, 3)]
    assert not torch.allclose(after[0], after[1]), f"{name}: the scores after a history ignore its last event's kind"
    blocks = [(hist, new, vec), (items[:3], items[3:5], vec)]
    together = model.score_event_blocks(blocks, context=cfg.session_len, kinds=[kinds[:16], bought[:5]])
    alone = torch.cat([model.score_events(hist, new, vec, context=cfg.session_len, kinds=kinds[:16]),
                       model.score_events(items[:3], items[3:5], vec, context=cfg.session_len, kinds=bought[:5])])
    assert torch.allclose(together, alone, atol=1e-4), f"{name}: blocks scored together lose their own kinds"
    g = _global(model)
    r1 = client_update(_model(cfg), g, DeviceState(), items, rounds, 3, cfg, device_id=4, noise_multiplier=0.0,
                       kinds=kinds)
    r2 = client_update(_model(cfg), g, DeviceState(), items, rounds, 3, cfg, device_id=4, noise_multiplier=0.0,
                       kinds=np.full(len(items), 3, np.int8))
    moved = [k for k in r1.delta if not np.allclose(r1.delta[k], r2.delta[k])]
    assert moved, f"{name}: an update with other event kinds trained the same"


def yield_checks(name: str) -> Iterator[Check]:
    """Every check of the contract, for the model ``name``."""
    yield check_partition
    yield check_user_state_never_leaves
    yield check_same_seed_same_result
    yield check_trains_under_every_privacy_mode
    yield check_save_load_round_trip
    yield check_ranking_excludes_seen
    yield check_learns
    yield check_instant_state
    yield check_event_contexts
