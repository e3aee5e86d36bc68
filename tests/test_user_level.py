"""User-level DP primitives: clipping a whole delta, the noisy mean, Poisson cohorts.

The noise test is statistical: with no deltas the returned mean is pure noise, so its sample
standard deviation over many coordinates must match the claimed ``noise_multiplier * clip /
expected_devices`` (chi-square 99.9% interval) and its mean must be ~0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedrec.privacy.user_level import clip_delta, noisy_mean, poisson_cohort


def _norm(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in d.values()))


def _flat(d: dict[str, np.ndarray], keys) -> np.ndarray:
    return np.concatenate([np.asarray(d[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)


# ----------------------------------------------------------------------------------------------
# clip_delta

_arrays = hnp.arrays(
    dtype=np.float32,
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
    elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False),
)
_deltas = st.dictionaries(st.sampled_from(["item.weight", "item.bias", "a", "b.c", "z"]), _arrays, min_size=1,
                          max_size=4)
_clips = st.floats(1e-3, 1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(delta=_deltas, clip=_clips)
def test_clip_delta_bounds_norm_and_keeps_direction(delta, clip):
    original = {k: v.copy() for k, v in delta.items()}
    norm_in = _norm(delta)

    out, pre, was_clipped = clip_delta(delta, clip)

    # input untouched (values, dtype, and not aliased by the output)
    assert set(delta) == set(original)
    for k in delta:
        np.testing.assert_array_equal(delta[k], original[k])
        assert delta[k].dtype == np.float32
        assert not np.shares_memory(out[k], delta[k])
    assert set(out) == set(delta)
    for k in out:
        assert out[k].dtype == np.float32 and out[k].shape == delta[k].shape
    assert pre == pytest.approx(norm_in, rel=1e-9, abs=1e-30)
    assert _norm(out) <= clip * (1 + 1e-6)
    if norm_in <= clip:
        assert not was_clipped
        for k in out:
            np.testing.assert_array_equal(out[k], delta[k])
    else:
        assert was_clipped
        assert _norm(out) == pytest.approx(clip, rel=1e-5)
        keys = sorted(delta)
        a, b = _flat(delta, keys), _flat(out, keys)
        cos = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos == pytest.approx(1.0, abs=1e-6)


def test_clip_delta_examples():
    d = {"x": np.array([3.0, 0.0], np.float32), "y": np.array([[4.0]], np.float32)}  # norm 5
    out, pre, c = clip_delta(d, 1.0)
    assert c and pre == 5.0
    np.testing.assert_allclose(out["x"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["y"], [[0.8]], rtol=1e-6)
    out, pre, c = clip_delta(d, 5.0)  # exactly at the clip: unchanged
    assert not c and pre == 5.0
    np.testing.assert_array_equal(out["x"], d["x"])
    # float64 input comes back float32
    out, _, _ = clip_delta({"x": np.array([0.5, 0.5])}, 10.0)
    assert out["x"].dtype == np.float32
    # all-zero delta
    out, pre, c = clip_delta({"x": np.zeros(3, np.float32)}, 1.0)
    assert pre == 0.0 and not c and not out["x"].any()


@pytest.mark.parametrize("clip", [0.0, -1.0, -1e-9])
def test_clip_delta_rejects_non_positive_clip(clip):
    d = {"x": np.ones(3, np.float32)}
    with pytest.raises(ValueError) as e:
        clip_delta(d, clip)
    msg = str(e.value)
    assert msg[0].isupper() and msg.endswith(".") and " " in msg
    assert "clip" in msg.lower()
    np.testing.assert_array_equal(d["x"], np.ones(3, np.float32))


def test_clip_delta_rejects_nan_clip():
    with pytest.raises(ValueError):
        clip_delta({"x": np.ones(3, np.float32)}, float("nan"))


# ----------------------------------------------------------------------------------------------
# noisy_mean


def _chi2_std_interval(n: int, conf: float = 0.999) -> tuple[float, float]:
    """Interval for (sample std / true std) of n normal draws at confidence ``conf``."""
    try:
        from scipy.stats import chi2

        lo, hi = chi2.ppf((1 - conf) / 2, n - 1), chi2.ppf(1 - (1 - conf) / 2, n - 1)
        return math.sqrt(lo / (n - 1)), math.sqrt(hi / (n - 1))
    except ImportError:  # normal approximation of the std's sampling distribution
        w = 3.3 / math.sqrt(2 * n)
        return 1 - w, 1 + w


@pytest.mark.parametrize("z,clip,m", [(1.0, 1.0, 20.0), (0.7, 2.5, 3.0)])
def test_noisy_mean_noise_statistics(z, clip, m):
    state = {"item.weight": torch.zeros(1000, 150), "item.bias": torch.zeros(50_000)}  # 200_000 coordinates
    g = torch.Generator().manual_seed(123)
    mean, diag = noisy_mean(state, [], clip=clip, noise_multiplier=z, expected_devices=m, generator=g)
    sigma = z * clip / m
    assert diag["noise_std"] == pytest.approx(sigma, rel=1e-12)
    assert diag["signal_norm"] == 0.0 and diag["snr"] == 0.0
    assert set(mean) == set(state)
    for k in state:
        assert mean[k].shape == state[k].shape and mean[k].dtype == state[k].dtype
        assert not state[k].any()  # the global state is not touched
    x = torch.cat([v.double().ravel() for v in mean.values()]).numpy()
    n = x.size
    assert n == 200_000
    lo, hi = _chi2_std_interval(n)
    ratio = float(x.std(ddof=1)) / sigma
    assert lo <= ratio <= hi, (ratio, lo, hi)
    assert abs(float(x.mean())) <= 4 * sigma / math.sqrt(n)
    # each tensor on its own too (a tensor left un-noised, or noised twice, would show here)
    for k, v in mean.items():
        y = v.double().ravel().numpy()
        lo_k, hi_k = _chi2_std_interval(y.size)
        assert lo_k <= float(y.std(ddof=1)) / sigma <= hi_k, k
    # no correlation between the two tensors' noise (e.g. the same draw reused)
    a, b = mean["item.weight"].double().ravel()[:50_000].numpy(), mean["item.bias"].double().numpy()
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 4 / math.sqrt(50_000)


def test_noisy_mean_same_seed_same_noise():
    state = {"w": torch.zeros(300, 7), "b": torch.zeros(11)}
    d = [{"w": np.full((300, 7), 0.001, np.float32), "b": np.zeros(11, np.float32)}]

    def run(seed):
        return noisy_mean(state, d, clip=1.0, noise_multiplier=1.3, expected_devices=4.0,
                          generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = run(5), run(5), run(6)
    for k in state:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["w"], c["w"])
    # successive calls on one generator draw fresh noise
    g = torch.Generator().manual_seed(5)
    first = noisy_mean(state, d, clip=1.0, noise_multiplier=1.3, expected_devices=4.0, generator=g)[0]
    second = noisy_mean(state, d, clip=1.0, noise_multiplier=1.3, expected_devices=4.0, generator=g)[0]
    torch.testing.assert_close(first["w"], a["w"], rtol=0, atol=0)
    assert not torch.equal(first["w"], second["w"])


def test_noisy_mean_without_noise_is_sum_over_expected_devices():
    state = {"w": torch.full((2, 2), 7.0), "b": torch.tensor([1.0, -1.0, 3.0])}
    d1 = {"w": np.array([[0.5, -0.25], [0.0, 0.125]], np.float32), "b": np.array([0.25, 0.0, -0.5], np.float32)}
    d2 = {"w": np.array([[0.25, 0.25], [-0.5, 0.0]], np.float32), "b": np.array([0.0, 0.5, 0.0], np.float32)}
    assert _norm(d1) <= 1.0 and _norm(d2) <= 1.0
    d1_copy = {k: v.copy() for k, v in d1.items()}
    mean, diag = noisy_mean(state, [d1, d2], clip=1.0, noise_multiplier=0.0, expected_devices=4.0,
                            generator=torch.Generator().manual_seed(0))
    # by hand: (d1 + d2) / 4
    want_w = torch.tensor([[0.1875, 0.0], [-0.125, 0.03125]])
    want_b = torch.tensor([0.0625, 0.125, -0.125])
    torch.testing.assert_close(mean["w"], want_w, rtol=0, atol=0)
    torch.testing.assert_close(mean["b"], want_b, rtol=0, atol=0)
    assert diag["noise_std"] == 0.0
    # the signal norm is that of the mean (sum / expected devices)
    assert diag["signal_norm"] == pytest.approx(math.sqrt(float((want_w ** 2).sum() + (want_b ** 2).sum())),
                                                rel=1e-6)
    # divided by the expected, not the realised, number of devices
    mean3, _ = noisy_mean(state, [d1, d2], clip=1.0, noise_multiplier=0.0, expected_devices=3.0,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean3["w"], want_w * 4 / 3, rtol=1e-6, atol=0)
    for k in d1:
        np.testing.assert_array_equal(d1[k], d1_copy[k])
    torch.testing.assert_close(state["w"], torch.full((2, 2), 7.0))


def test_noisy_mean_rejects_unclipped_delta_and_bad_expected():
    state = {"w": torch.zeros(4)}
    big = {"w": np.array([0.6, 0.6, 0.6, 0.0], np.float32)}  # norm 1.039 > clip 1
    with pytest.raises(ValueError, match="exceeds the clip"):
        noisy_mean(state, [big], clip=1.0, noise_multiplier=1.0, expected_devices=2.0,
                   generator=torch.Generator().manual_seed(0))
    ok = {"w": np.array([0.5, 0.5, 0.5, 0.5], np.float32)}  # norm exactly 1: fine
    noisy_mean(state, [ok, ok], clip=1.0, noise_multiplier=1.0, expected_devices=2.0,
               generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exceeds the clip"):  # one bad among good ones is still refused
        noisy_mean(state, [ok, big], clip=1.0, noise_multiplier=1.0, expected_devices=2.0,
                   generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        noisy_mean(state, [ok], clip=1.0, noise_multiplier=1.0, expected_devices=0.0,
                   generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------
# poisson_cohort


@pytest.mark.parametrize("q", [0.02, 0.3])
def test_poisson_cohort_size(q):
    n = 10_000
    rng = np.random.default_rng(42)
    pop = list(range(100, 100 + n))
    sizes = []
    for _ in range(5):
        c = poisson_cohort(pop, q, rng)
        assert len(set(c)) == len(c) and set(c) <= set(pop)
        assert c == sorted(c) and all(isinstance(d, int) for d in c)
        assert abs(len(c) - q * n) <= 5 * math.sqrt(n * q * (1 - q)), len(c)
        sizes.append(len(c))
    assert len(set(sizes)) > 1  # the size is random, not fixed at q*N


def test_poisson_cohort_inclusion_frequency():
    n_pop, draws, q = 50, 400, 0.3
    rng = np.random.default_rng(7)
    pop = [3 * i + 1 for i in range(n_pop)]  # device ids are not indices
    hits = dict.fromkeys(pop, 0)
    pairs = 0
    for _ in range(draws):
        c = poisson_cohort(pop, q, rng)
        for d in c:
            hits[d] += 1
        pairs += (pop[0] in c) and (pop[1] in c)
    sd = math.sqrt(q * (1 - q) / draws)
    for d, h in hits.items():
        assert abs(h / draws - q) <= 5 * sd, (d, h / draws)
    # independence: P(both of two devices) ≈ q^2
    assert abs(pairs / draws - q * q) <= 5 * math.sqrt(q * q * (1 - q * q) / draws)


def test_poisson_cohort_edges():
    rng = np.random.default_rng(0)
    assert poisson_cohort([], 0.5, rng) == []
    assert poisson_cohort([4, 5, 6], 1.0, rng) == [4, 5, 6]
    assert poisson_cohort(list(range(1000)), 0.0, rng) == []
    a = poisson_cohort(list(range(500)), 0.2, np.random.default_rng(9))
    b = poisson_cohort(list(range(500)), 0.2, np.random.default_rng(9))
    assert a == b
