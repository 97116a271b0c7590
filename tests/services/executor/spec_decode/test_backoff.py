import pytest

from services.executor.spec_decode.backoff import DraftBackoff


def test_full_length_while_drafts_are_accepted():
    b = DraftBackoff(4)
    assert b.num_drafts("a") == 4  # prior alpha 0.8: 0.8^4 = 0.41 > floor 0.1
    for _ in range(5):
        b.record("a", 4, 4)
        assert b.num_drafts("a") == 4
    assert b.alpha("a") > 0.95


def test_alpha_counts_accepted_drafts_and_the_first_rejection_only():
    b = DraftBackoff(4)
    b.record("a", 4, 1)  # one success, one failure; the two drafts after it never judged
    assert b.alpha("a") == pytest.approx((0.5 * 0.8 + 1) / (0.5 * 1 + 2))
    b.record("b", 3, 3)  # all accepted: no failure
    assert b.alpha("b") == pytest.approx((0.4 + 3) / (0.5 + 3))


def test_length_is_the_longest_run_worth_its_rows():
    b = DraftBackoff(8)
    b.record("a", 8, 1)
    b.record("a", 8, 1)  # alpha = (0.7 + 1) / (1.25 + 2) ~= 0.523
    assert b.alpha("a") == pytest.approx(1.7 / 3.25)
    assert b.num_drafts("a") == 3  # the floor 0.1: alpha^3 = 0.143 passes, alpha^4 = 0.075 not
    assert b.num_drafts("a", threshold=0.3) == 1  # alpha > 0.3 > alpha^2
    assert b.num_drafts("a", threshold=0.2) == 2


def test_nothing_worth_drafting_cools_down_with_growing_pauses_then_probes():
    b = DraftBackoff(4)
    b.record("a", 4, 0)
    b.record("a", 4, 0)  # alpha = 0.2 / 1.75 = 0.114: one draft still passes the floor
    assert b.num_drafts("a") == 1
    b.record("a", 1, 0)  # 0.1 / 1.875 = 0.053
    # this step and 3 more without drafts, then a probe of one draft
    assert [b.num_drafts("a") for _ in range(5)] == [0, 0, 0, 0, 1]
    b.record("a", 1, 0)  # still rejected: twice as long
    assert [b.num_drafts("a") for _ in range(9)] == [0] * 8 + [1]
    b.record("a", 1, 1)
    b.record("a", 4, 4)  # predictable again: full length, pauses reset
    assert b.num_drafts("a") == 4 and b._tracks["a"].next_cooldown == 4


def test_a_costly_row_stops_drafts_that_a_cheap_one_allows():
    b = DraftBackoff(4)
    b.record("a", 4, 2)
    b.record("a", 4, 2)  # alpha = 3.2 / 4.75 ~= 0.674
    assert b.num_drafts("a", threshold=0.0) == 4  # cheap rows: 0.674^4 = 0.21 > the floor
    assert b.num_drafts("a", threshold=0.7) == 0  # a big CPU batch: not worth one row


def test_disabled_and_per_request():
    b = DraftBackoff(3, enabled=False)
    b.record("a", 3, 0)
    assert b.num_drafts("a", threshold=0.99) == 3
    b = DraftBackoff(3)
    for _ in range(3):
        b.record("a", 3, 0)
    assert b.num_drafts("a") == 0 and b.num_drafts("b") == 3
    b.remove("a")
    assert b.num_drafts("a") == 3
