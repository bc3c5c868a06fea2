"""Intervals that are honest at small n, and random streams that never collide."""
import itertools

import numpy as np
import pytest

import common
import grpo_introspect as gi


def test_t_quantiles_match_published_values():
    # t_{0.975, df} from any statistics table; df > 30 goes through the expansion
    for df, t in [(1, 12.706), (3, 3.182), (10, 2.228), (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980)]:
        assert common.t975(df) == pytest.approx(t, abs=2e-3)


def test_mean_ci_is_student_t_not_normal_at_small_n():
    x = [0.0, 0.25, 0.5, 0.25]
    ci = common.mean_ci(x, binary=False)
    half = 3.1824 * np.std(x, ddof=1) / 2
    assert ci["hi"] - ci["mean"] == pytest.approx(half)
    assert ci["hi"] - ci["mean"] > 1.5 * 1.96 * np.std(x, ddof=1) / 2   # a z interval is far narrower


def test_t_interval_covers_95_percent_at_n4():
    rng = np.random.default_rng(0)
    hits = sum(ci["lo"] <= 0 <= ci["hi"] for ci in (common.mean_ci(rng.normal(size=4), binary=False)
                                                   for _ in range(4000)))
    assert 0.93 < hits / 4000 < 0.97


def test_equal_differences_get_no_zero_width_interval():
    ci = common.mean_ci([0.25] * 4, binary=False)
    assert "note" in ci and not np.isfinite(ci["lo"])
    assert "no interval" in common.fmt_ci(ci)


def test_mean_ci_needs_the_caller_to_say_binary():
    with pytest.raises(TypeError):
        common.mean_ci([0, 1, 1])                       # no silent switch to Wilson
    with pytest.raises(ValueError):
        common.mean_ci([0, 0.5, 1], binary=True)
    ci = common.mean_ci([1, 1, 1, 1], binary=True)     # Wilson: all successes still leave room
    assert ci["lo"] < 0.6 and ci["hi"] == pytest.approx(1.0)


def test_paired_binary_interval_has_width_when_every_pair_agrees():
    ci = gi.paired_binary_ci([1, 1, 1, 1], [0, 0, 0, 0])
    assert ci["mean"] == 1.0 and 0.2 < ci["lo"] < 0.6 and ci["hi"] == 1.0
    ci = gi.paired_binary_ci([1, 0, 1, 0], [1, 0, 1, 0])
    assert ci["mean"] == 0 and ci["lo"] < -0.3 and ci["hi"] > 0.3


def test_paired_binary_interval_coverage():
    rng = np.random.default_rng(1)
    n, hits, trials = 12, 0, 2000
    for _ in range(trials):
        u = rng.random(n)                                # correlated pairs, as in paired sampling
        a, b = (u < 0.5).astype(float), (u < 0.3).astype(float)
        ci = gi.paired_binary_ci(a, b)
        hits += ci["lo"] <= 0.2 <= ci["hi"]
    assert hits / trials > 0.93


def test_cluster_bootstrap_is_wider_than_pretending_independence():
    # 11 questions x 4 samples where samples of a question agree: 44 values, ~11 draws
    rng = np.random.default_rng(2)
    groups = [np.full(4, float(rng.random() < 0.4)) for _ in range(11)]
    boot = common.cluster_bootstrap_ci(groups, seed=0)
    naive = common.mean_ci(np.concatenate(groups), binary=True)
    assert boot["n"] == 44 and boot["n_clusters"] == 11
    assert (boot["hi"] - boot["lo"]) > 1.4 * (naive["hi"] - naive["lo"])


def test_cluster_bootstrap_flags_no_variation():
    ci = common.cluster_bootstrap_ci([np.zeros(4)] * 3)
    assert ci["mean"] == 0 and "note" in ci


def test_stream_seeds_never_collide():
    streams = ["rollout", "transfer", "validation", "canary", "matrix", "matrix-rescore", "oracle",
               "eval", "dev", "select", "sft-data", "dream", "teacher", "pmd", "reflect", "split"]
    seen = {}
    for s, a, b in itertools.product(streams, range(20), range(6)):
        k = common.stream_seed(0, s, a, b)
        assert k not in seen, (s, a, b, seen.get(k))
        seen[k] = (s, a, b)
    # and a stream never reproduces the plain per-row seeds of the sampler
    assert not {common.row_seed(0, a, b) for a in range(20) for b in range(6)} & set(seen)
