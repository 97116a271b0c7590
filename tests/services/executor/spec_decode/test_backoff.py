from services.executor.spec_decode.backoff import DraftBackoff


def test_full_length_while_drafts_are_accepted():
    b = DraftBackoff(4)
    assert b.num_drafts("a") == 4
    for _ in range(5):
        b.record("a", 4, 3)
        assert b.num_drafts("a") == 4


def test_low_acceptance_halves_then_cools_down_with_growing_pauses():
    b = DraftBackoff(4)
    b.record("a", 4, 1)  # rate 0.625
    assert b.num_drafts("a") == 4
    b.record("a", 4, 0)  # 0.3125: half length
    assert b.num_drafts("a") == 2
    b.record("a", 2, 0)  # 0.156: cool down 4 steps, then probe at half length
    assert [b.num_drafts("a") for _ in range(5)] == [0, 0, 0, 0, 2]
    b.record("a", 2, 0)  # 0.2: cool down again, twice as long
    assert [b.num_drafts("a") for _ in range(9)] == [0] * 8 + [2]
    b.record("a", 2, 2)  # accepted: back to full length, pauses reset
    assert b.num_drafts("a") == 4 and b._tracks["a"].next_cooldown == 4


def test_disabled_and_per_request():
    b = DraftBackoff(3, enabled=False)
    b.record("a", 3, 0)
    assert b.num_drafts("a") == 3
    b = DraftBackoff(3)
    for _ in range(3):  # rate 0.5, 0.25, 0.125: cool down
        b.record("a", 3, 0)
    assert b.num_drafts("a") == 0 and b.num_drafts("b") == 3
    b.remove("a")
    assert b.num_drafts("a") == 3
