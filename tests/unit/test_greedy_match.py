"""The tie-aware match of greedy outputs against a colocated reference (tests/colocated.py)."""

from tests.colocated import TIE_NATS, GreedyTokens

# Step 1 has an exact tie between 20 and 21; step 2 a clear winner.
REF = GreedyTokens([10, 20, 30], [{10: -0.1, 11: -2.0}, {20: -3.2, 21: -3.2, 22: -3.6},
                                  {30: -0.5, 31: -0.5 - 2 * TIE_NATS}])


def test_equal_tokens_match():
    assert [10, 20, 30] == REF and not ([10, 20, 30] != REF)


def test_divergence_at_a_tie_matches_and_the_rest_is_not_compared():
    assert [10, 21, 99] == REF


def test_divergence_elsewhere_does_not_match():
    assert [11, 20, 30] != REF          # 11 is a candidate, but far from the choice
    assert [10, 22, 30] != REF          # 0.4 nats away: not a tie
    assert [10, 20, 31] != REF          # just over the tolerance
    assert [10, 20, 99] != REF          # not among the candidates at all


def test_lengths_must_agree_without_a_tie():
    assert [10, 20] != REF and [10, 20, 30, 40] != REF


class Tokens:
    """A tokenizer whose decode joins token ids with spaces."""

    @staticmethod
    def decode(ids):
        return " ".join(map(str, ids))


def test_text_matches_the_same_way():
    assert REF.matches_text(Tokens, "10 20 30")
    assert REF.matches_text(Tokens, "10 21 whatever")
    assert not REF.matches_text(Tokens, "10 22 30")
    assert not REF.matches_text(Tokens, "11 20 30")
