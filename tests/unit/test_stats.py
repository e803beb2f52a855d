"""The verdict's paired statistics against numbers worked by hand (t from a printed t-table)."""

from __future__ import annotations

import pytest

from lift3d.train.stats import paired_difference, t_critical


def test_t_table_values():
    assert t_critical(2) == pytest.approx(4.303, abs=5e-4)  # 3 seeds
    assert t_critical(4) == pytest.approx(2.776, abs=5e-4)  # 5 seeds
    assert t_critical(1) == pytest.approx(12.706, abs=5e-4)
    with pytest.raises(ValueError, match="2 seeds"):
        t_critical(0)


def test_three_seeds_hand_computed():
    # d = 2, 3, 4: mean 3, s_d = 1, half width 4.3027 / sqrt(3) = 2.4841
    r = paired_difference({0: 30.0, 1: 32.0, 2: 31.0}, {0: 28.0, 1: 29.0, 2: 27.0})
    assert r["per_seed"] == [2.0, 3.0, 4.0] and r["seeds"] == [0, 1, 2]
    assert r["mean"] == pytest.approx(3.0) and r["std"] == pytest.approx(1.0)
    assert r["ci95_low"] == pytest.approx(0.5159, abs=1e-4) and r["ci95_high"] == pytest.approx(5.4841, abs=1e-4)


def test_five_seeds_hand_computed():
    # d = 1..5: mean 3, s_d = sqrt(10 / 4) = 1.5811, half width 2.7764 * 1.5811 / sqrt(5) = 1.9632
    scratch = {s: 20.0 for s in range(5)}
    r = paired_difference({s: 21.0 + s for s in range(5)}, scratch)
    assert r["std"] == pytest.approx(1.5811, abs=1e-4)
    assert r["ci95_low"] == pytest.approx(1.0368, abs=1e-4) and r["ci95_high"] == pytest.approx(4.9632, abs=1e-4)


def test_pairs_only_shared_seeds_and_one_seed_has_no_interval():
    r = paired_difference({0: 5.0, 7: 9.0}, {0: 4.0, 1: 0.0})
    assert r["seeds"] == [0] and r["mean"] == 1.0 and r["ci95_low"] is None and r["std"] is None
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({1: 1.0}, {2: 1.0})
