"""The shipped law is monotone in both head counts at every size: at equal N, more KV heads or more
query heads never raise the loss (removing heads never lowers it: issue 3, and issue 16's "over at
least 3e6–6e10 parameters"); and the delta a conversion of a small model reads off the law is a
small loss increase, not a gain. The law's ranking of query-head against KV-head changes (it values
a KV-head doubling more than a query-head doubling up to 32 heads, unlike the paper's statement) is
pinned below so that docs/law.md stays true."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_convert.law.loss import candidates, load_law
from gqa_convert.law.shapes import ModelShape

N_GRID = np.logspace(5, 12, 141)  # 1e5 … 1e12 non-embedding parameters, 8 points per octave-ish
STORIES = ModelShape(5, 64, 8, 4, 8, 172, 512, tied=True)  # stories260K (hidden 64, d_h 8, ffn 172)


@pytest.mark.parametrize("max_heads", [32, 64])
def test_more_kv_heads_never_raise_the_loss(max_heads):
    law = load_law()
    for h, k in candidates(max_heads):
        if 2 * k <= h:
            worse, better = law.loss(N_GRID, h, k), law.loss(N_GRID, h, 2 * k)
            assert np.all(better <= worse + 1e-12), ((h, k), N_GRID[np.argmax(better - worse)])


@pytest.mark.parametrize("max_heads", [32, 64])
def test_more_query_heads_never_raise_the_loss(max_heads):
    law = load_law()
    for h, k in candidates(max_heads):
        if 2 * h <= max_heads:
            worse, better = law.loss(N_GRID, h, k), law.loss(N_GRID, 2 * h, k)
            assert np.all(better <= worse + 1e-12), ((h, k), N_GRID[np.argmax(better - worse)])


DENSE = np.logspace(np.log10(3e6), np.log10(6e10), 2001)  # issue 16's range, 2001 points


def test_removing_heads_never_lowers_the_loss_on_a_dense_grid():
    """Every single doubling of n_h or of n_kv among the configurations up to 64 heads, and every
    integer head count in between (the law is read for 12, 24, 48 heads, 3 or 6 KV heads: plan),
    at 2001 values of N from 3e6 to 6e10."""
    law = load_law()
    n = DENSE[:, None]
    for h, k in candidates(64):
        base = law.loss(DENSE, h, k)
        if 2 * k <= h:
            assert np.all(law.loss(DENSE, h, 2 * k) < base), (h, k, "kv")
        if 2 * h <= 64:
            assert np.all(law.loss(DENSE, 2 * h, k) < base), (h, k, "q")
    for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        heads = np.arange(k, 65)  # every query-head count from n_kv up: loss never rises
        assert np.all(np.diff(law.loss(n, heads[None, :], k), axis=1) <= 1e-12), k
    for h in (2, 3, 4, 6, 8, 12, 16, 24, 28, 32, 40, 48, 64):
        kv = np.arange(1, h + 1)
        assert np.all(np.diff(law.loss(n, h, kv[None, :]), axis=1) <= 1e-12), h


def test_how_the_law_ranks_query_heads_against_kv_heads():
    """docs/law.md: at equal N, from (32, 8), halving the KV heads costs more than halving the query
    heads (the paper states the opposite); removing both costs more than either."""
    law = load_law()
    for n in (1e8, 1e9, 1e10):
        src = law.loss(n, 32, 8)
        dq, dkv, both = law.loss(n, 16, 8) - src, law.loss(n, 32, 4) - src, law.loss(n, 16, 4) - src
        print(f"N={n:.0e}: (16,8) {dq:+.4f}  (32,4) {dkv:+.4f}  (16,4) {both:+.4f}")
        assert 0 < dq < dkv < both


def test_loss_falls_with_size_for_every_configuration():
    law = load_law()
    for h, k in candidates(64):
        assert np.all(np.diff(law.loss(N_GRID, h, k)) < 0), (h, k)


def test_stories260k_conversion_delta_is_a_small_increase():
    """stories260K (8 q / 4 KV heads, 226,560 non-embedding parameters) is 13x below the smallest
    model the paper fitted: an extrapolation, but the sign must be right and the size modest. The
    deltas (+0.21, +0.35) are above the 0.1 one would like: the law's reducible loss at this size is
    several nats, so the 4.5% / 6.8% fewer parameters alone cost ~0.2 / 0.3 (docs/law.md)."""
    law = load_law()
    n = STORIES.non_embedding_params
    assert n == 226_560
    for k in (2, 1):
        new = STORIES.with_heads(8, k)
        delta = law.delta(n, (8, 4), new.non_embedding_params, (8, k))
        print(f"stories260K 8/4 -> 8/{k}: predicted delta {delta:+.4f} nats")
        assert 0 < delta < (0.25 if k == 2 else 0.4)


def test_stories260k_fixture_shape(stories_hf):
    from gqa_convert.law.shapes import load_shape

    shape = load_shape(stories_hf)
    assert (shape.n_layers, shape.hidden, shape.n_heads, shape.n_kv, shape.head_dim, shape.d_ff, shape.vocab) == (
        5,
        64,
        8,
        4,
        8,
        172,
        512,
    )
    assert shape.non_embedding_params == STORIES.non_embedding_params


def test_earlier_unconstrained_law_ships_by_name_and_is_not_monotone():
    """`--law shipped:table4` is the retired earlier reconstruction, loadable by name for backwards
    compatibility: it inverts at small N (why it is not the default)."""
    old = load_law("shipped:table4")
    assert "NOT MONOTONE" in old.provenance
    assert old.loss(3e6, 32, 1) < old.loss(3e6, 32, 8)
    from gqa_convert.errors import ConfigError

    with pytest.raises(ConfigError, match="shipped:table4") as err:
        load_law("shipped:nope")
    assert "\n" not in str(err.value)
