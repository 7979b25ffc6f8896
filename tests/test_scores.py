"""Unit scores: normalisation, PIDiff ordering and weights, Wanda / Taylor / random, scoring a store."""

from __future__ import annotations

import numpy as np
import pytest

from tinyonn.store.scores import (
    PIDIFF_FORMULA,
    ScoreConfig,
    normalise,
    pidiff,
    random_score,
    score_store,
    summary_score_fn,
    taylor,
    wanda,
)
from tinyonn.store.zarr_store import ChunkStats, ScoreStoreWriter


def test_normalise_rank_averages_ties_and_keeps_nan():
    out = normalise(np.array([3.0, 1.0, 2.0, 2.0, np.nan]), "rank")
    np.testing.assert_array_equal(out[:4], [1.0, 0.0, 0.5, 0.5])
    assert np.isnan(out[4])
    np.testing.assert_array_equal(normalise(np.array([10.0, -5.0, 7.0]), "rank"), [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(normalise(np.array([4.0]), "rank"), [0.5])
    assert np.isnan(normalise(np.array([np.nan, np.nan]), "rank")).all()


def test_normalise_zscore_and_none():
    np.testing.assert_allclose(normalise(np.array([1.0, 2.0, 3.0]), "zscore"), [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])
    out = normalise(np.array([2.0, np.nan, 4.0]), "zscore")
    np.testing.assert_allclose(out[[0, 2]], [-1.0, 1.0])
    assert np.isnan(out[1])
    np.testing.assert_array_equal(normalise(np.array([5.0, 5.0, 5.0]), "zscore"), [0.0, 0.0, 0.0])
    raw = np.array([1.5, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(normalise(raw, "none"), raw.astype(np.float64))
    with pytest.raises(ValueError, match="rank, zscore or none"):
        normalise(np.ones(3), "minmax")


def test_pidiff_prefers_high_act_low_grad_high_freq():
    act = np.array([0.9, 0.5, 0.1])
    grad = np.array([1e-4, 1e-2, 1.0])
    freq = np.array([0.8, 0.5, 0.2])
    for norm in ("rank", "zscore", "none"):
        score = pidiff(act, freq, grad, norm=norm)
        assert list(np.argsort(-score)) == [0, 1, 2], norm
    np.testing.assert_array_equal(pidiff(act, freq, grad, norm="rank"), [3.0, 1.5, 0.0])
    # norm="none" is the design formula verbatim
    np.testing.assert_allclose(pidiff(act, freq, grad, 2.0, 0.5, 3.0, eps=1e-3, norm="none"),
                               2.0 * act + 0.5 / (grad + 1e-3) + 3.0 * freq)
    assert "w2*N(1/(G+eps))" in PIDIFF_FORMULA


def test_pidiff_weights_change_the_ordering():
    # unit 0: strong but rare; unit 1: weak but frequent; same gradient
    act, freq, grad = np.array([0.9, 0.1]), np.array([0.1, 0.9]), np.array([0.01, 0.01])
    assert np.argmax(pidiff(act, freq, grad, w1=3.0, w2=1.0, w3=1.0)) == 0
    assert np.argmax(pidiff(act, freq, grad, w1=1.0, w2=1.0, w3=3.0)) == 1
    # only the gradient term: the unit with the smaller gradient wins
    assert np.argmax(pidiff(act, freq, np.array([0.5, 0.01]), w1=0.0, w2=1.0, w3=0.0)) == 1
    with pytest.raises(ValueError, match="one shape"):
        pidiff(act, freq, np.ones(3))


def test_wanda_taylor_random():
    np.testing.assert_array_equal(wanda(np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.5, 1.0])), [2.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="down_norm"):
        wanda(np.ones(3), np.ones(2))
    t = np.array([0.3, 0.1, 0.2], dtype=np.float32)
    np.testing.assert_array_equal(taylor(t), t.astype(np.float64))
    np.testing.assert_array_equal(taylor(t, norm="rank"), [1.0, 0.0, 0.5])
    r = random_score(1000, seed=3)
    assert r.shape == (1000,) and 0.0 <= r.min() and r.max() < 1.0
    np.testing.assert_array_equal(r, random_score(1000, seed=3))
    assert not np.array_equal(r, random_score(1000, seed=4))


def test_score_config_validation():
    assert ScoreConfig().method == "pidiff" and ScoreConfig().norm == "rank"
    with pytest.raises(ValueError, match="method"):
        ScoreConfig(method="magnitude")
    with pytest.raises(ValueError, match="norm"):
        ScoreConfig(norm="minmax")
    with pytest.raises(ValueError, match="weights"):
        ScoreConfig(weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="eps"):
        ScoreConfig(eps=0.0)


def small_store(path, *, down_norm=True, config=ScoreConfig()):
    rng = np.random.default_rng(7)
    n, u = 12, 10
    writer = ScoreStoreWriter.open(
        path, units_layer=np.repeat([0, 1], 5), units_index=np.tile(np.arange(5), 2), heads_layer=[], heads_index=[],
        categories=["a", "b"], sample_category=np.arange(n) % 2, source_index=np.arange(n), chunk_samples=5,
        per_sample=False, units_down_norm=rng.random(u) + 0.5 if down_norm else None,
        attrs={"fingerprint": "small", "formula": PIDIFF_FORMULA})
    data = {k: rng.random((n, u)).astype(np.float32) for k in ("act", "freq", "grad", "taylor")}
    for k in writer.pending_chunks():
        s, e = writer.chunk_range(k)
        writer.write_chunk(k, ChunkStats(**{name: v[s:e] for name, v in data.items()},
                                         head_out=np.zeros((e - s, 0), np.float32),
                                         head_grad=np.zeros((e - s, 0), np.float32),
                                         loss=np.ones(e - s, np.float32), n_tokens=np.full(e - s, 4)))
    return writer.finalize(summary_score_fn(config)), data


def test_score_store_matches_finalize_and_dispatches(tmp_path):
    store, data = small_store(tmp_path / "s.zarr")
    stored = store.summary_of("score")
    computed = score_store(store, ScoreConfig())
    assert computed.dtype == np.float32
    np.testing.assert_array_equal(computed, stored)  # bitwise: same float32 inputs, same function
    act = data["act"].astype(np.float64).mean(axis=0)
    grad = data["grad"].astype(np.float64).mean(axis=0)
    freq = data["freq"].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(stored, pidiff(act, freq, grad), atol=1e-6)

    down_norm = store.down_norm()
    np.testing.assert_allclose(score_store(store, ScoreConfig(method="wanda")), down_norm * store.summary_of("act"),
                               rtol=1e-6)
    np.testing.assert_array_equal(score_store(store, ScoreConfig(method="taylor")), store.summary_of("taylor"))
    np.testing.assert_array_equal(score_store(store, ScoreConfig(method="random", seed=5)),
                                  random_score(10, 5).astype(np.float32))
    z = score_store(store, ScoreConfig(norm="zscore", weights=(1.0, 0.0, 0.0)))
    np.testing.assert_allclose(z, normalise(store.summary_of("act"), "zscore"), atol=1e-6)


def test_wanda_needs_down_norm(tmp_path):
    store, _ = small_store(tmp_path / "s.zarr", down_norm=False)
    with pytest.raises(ValueError, match="needs summary 'down_norm'.*units_down_norm"):
        score_store(store, ScoreConfig(method="wanda"))
