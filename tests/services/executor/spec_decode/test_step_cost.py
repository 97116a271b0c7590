import pytest

from services.executor.spec_decode.step_cost import StepCost


def test_fits_the_per_row_cost_of_varying_steps():
    c = StepCost()
    for rows in [16, 20, 24, 18, 30, 16, 22] * 5:
        c.record(rows, 0.050 + 0.002 * rows)
    assert c.row_seconds() == pytest.approx(0.002, rel=1e-6)
    assert c.step_seconds(16) == pytest.approx(0.082, rel=1e-6)
    # 16 requests, 16 rows: one row costs 16 * 0.002 / 0.082 of a step's tokens, and in a
    # batch an accepted token is credited (2 - 1/16)^-1
    assert c.draft_threshold(16, 16) == pytest.approx(0.032 / 0.082 * (2 - 1 / 16), rel=1e-6)
    assert c.draft_threshold(1, 16) == pytest.approx(0.002 / 0.082, rel=1e-6)  # alone: full credit


def test_unknown_until_the_rows_vary():
    c = StepCost()
    assert c.row_seconds() == 0.0 and c.draft_threshold(4, 4) == 0.0
    for _ in range(10):
        c.record(8, 0.1)
    assert c.row_seconds() == 0.0 and c.draft_threshold(8, 8) == 0.0
    assert c.step_seconds(8) == pytest.approx(0.1)


def test_follows_a_changed_machine():
    c = StepCost()
    for rows in [1, 5] * 20:
        c.record(rows, 0.030 + 0.0001 * rows)  # memory-bound: rows nearly free
    cheap = c.draft_threshold(1, 1)
    for rows in [1, 5] * 100:
        c.record(rows, 0.030 + 0.005 * rows)  # rows became expensive
    assert cheap < 0.01 and c.row_seconds() == pytest.approx(0.005, rel=1e-2)
    assert c.draft_threshold(1, 1) == pytest.approx(0.005 / 0.035, rel=1e-2)
