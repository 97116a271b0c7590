from services.executor.spec_decode.ngram import NgramProposer


def test_longest_suffix_match_continues_the_earlier_text():
    p = NgramProposer(2, 4)
    # Suffix "1 2 3" (n=3) occurred at the start: what followed it is proposed.
    assert p.propose_one([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]
    # The longest n wins: "7 1 2" (n=3) beats the later "1 2" (n=2).
    assert p.propose_one([7, 1, 2, 8, 8, 1, 2, 6, 6, 7, 1, 2], 2) == [8, 8]


def test_the_latest_match_with_a_full_run_is_used():
    p = NgramProposer(2, 2)
    tokens = [5, 6, 1, 1, 1, 5, 6, 2, 2, 2, 5, 6]
    assert p.propose_one(tokens, 3) == [2, 2, 2]
    # Too close to the end for a full run: the earliest match instead.
    assert p.propose_one([5, 5, 5, 5, 5, 5], 3) == [5, 5, 5]


def test_nothing_to_propose():
    p = NgramProposer(2, 4)
    assert p.propose_one([1, 2, 3, 4, 5], 4) == []  # no suffix recurs
    assert p.propose_one([1, 2], 4) == []  # too short
    assert p.propose_one([1, 2, 1, 2], 0) == []  # no drafts wanted
    assert NgramProposer(3, 3).propose_one([1, 2, 9, 1, 2], 2) == []  # only a 2-gram recurs
    # Bounded by what follows the match.
    assert p.propose_one([4, 5, 6, 4, 5], 8) == [6, 4, 5]
