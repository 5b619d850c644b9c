"""Answer matching (exact match: normalisation, aliases, containment), answer extraction and
ROUGE-L."""

import pytest

from factmem.scoring import final_number, is_match, last_boxed, rouge_l


def test_normalised_exact_match_any_alias_counts():
    assert is_match("  Paris \n", ["paris"])
    assert is_match("FRANCE", ["Paris", "france"])
    assert not is_match("Paris, France", ["paris"])
    assert is_match("It is Paris, France", ["paris"], mode="contains")


def test_rouge_l_and_answer_extraction():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "a b") == 0.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F1 = 0.75
    assert rouge_l("A b c d", "a c d e") == pytest.approx(0.75)
    assert final_number("x\n#### 1,234") == "1234" and final_number("it is 18.00") == "18"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
