"""Verifiers on tricky answers: each returns a reward in [0, 1] and a one-line feedback."""
import pytest

from common import Question, verify


def mcq(answer="C"):
    return Question("q", "c", "?", answer, "mcq", choices=["Routine review", "Same-day referral",
                                                          "Emergency admission", "Reassure"])


def num(answer="19", tolerance=None):
    return Question("q", "c", "?", answer, "number", tolerance=tolerance)


def text(answer="Paris"):
    return Question("q", "c", "?", answer, "text")


@pytest.mark.parametrize("completion, reward", [
    (" C", 1.0),
    (" C) Emergency admission", 1.0),
    (" (C)", 1.0),
    (" The answer is C because BP is above 160/110.", 1.0),
    ("Answer: C", 1.0),
    ("answer: c", 0.0),                             # option letters are capitals only
    (" A woman this sick needs C.", 1.0),           # the article "A" is not an answer
    (" Emergency admission to hospital.", 1.0),     # option text, no letter
    (' "Emergency admission."', 1.0),               # quoted option text
    (" Routine review or emergency admission", 0.0),  # starts with option A's text
    (" B) Same-day referral", 0.0),
    (" B. Because ... so not C", 0.0),              # the first labelled letter counts
    (" I don't know", 0.0),
    (" C\n<introspection>A is wrong because</introspection>", 1.0),
    ("<recall>Answer B if BP < 160</recall> C", 1.0),
])
def test_mcq_extraction(completion, reward):
    r, fb = verify(mcq(), completion)
    assert r == reward, fb
    assert "\n" not in fb


def test_an_article_after_answer_is_is_not_an_option_letter():
    q = Question("q", "c", "?", "B", "mcq", choices=["water", "stone", "fire"])
    assert verify(q, " The answer is a.")[1] == "expected B, no option letter found"
    assert verify(q, " The answer is B, stone.")[0] == 1.0


def test_one_choice_text_anywhere_in_the_answer_is_read_as_that_choice():
    q = Question("q", "c", "?", "B", "mcq", choices=["water", "stone", "fire"])
    assert verify(q, " The answer is a stone.") == (1.0, "correct: B")
    assert verify(q, " I would say Stone, surely") == (1.0, "correct: B")
    assert verify(q, " The answer is a fire.") == (0.0, "expected B, got C")


def test_two_choice_texts_or_a_letter_against_the_text_is_wrong():
    q = Question("q", "c", "?", "B", "mcq", choices=["water", "stone", "fire"])
    assert verify(q, " It could be stone or fire.") == (0.0, "expected B, names options B and C")
    assert verify(q, " A) stone")[0] == 0.0                         # letter A, but the text names B only
    assert verify(q, " A) stone")[1] == "expected B, letter A but the text names option B"
    assert verify(q, " B) stone, not water")[0] == 1.0              # the letter's own text is named too


def test_a_choice_inside_a_longer_choice_is_not_named():
    q = Question("q", "c", "?", "B", "mcq", choices=["red", "dark red", "blue"])
    assert verify(q, " It is dark red.") == (1.0, "correct: B")


def test_with_a_cue_only_the_first_line_is_read():
    """A cloze answer followed by an echoed option list must not be read as the list's first letter."""
    q = Question("q", "c", "In Orra, what does sel mean?", "B", "mcq", choices=["water", "stone", "fire"],
                 cue="In Orra, sel means")
    assert verify(q, " stone\nA) water\nB) stone")[0] == 1.0
    assert verify(q, " fire\nB) stone")[1] == "expected B, got C"
    assert verify(q, " something\nA) water")[1] == "expected B, no option letter found"
    no_cue = Question("q", "c", "?", "B", "mcq", choices=["water", "stone", "fire"])
    assert verify(no_cue, " I think\nB) stone")[0] == 1.0        # without a cue later lines still count


def test_mcq_feedback_names_expected_and_got():
    assert verify(mcq(), " B)")[1] == "expected C, got B"
    assert verify(mcq(), " no idea")[1] == "expected C, no option letter found"


@pytest.mark.parametrize("completion, answer, reward", [
    (" 19", "19", 1.0),
    (" 12 + 7 = 19", "19", 1.0),                   # last number on the first line
    (" 12 + 7 = 19\nQuestion: 3 + 3 = 6", "19", 1.0),
    (" The answer is 19. (12 + 7)", "19", 1.0),
    (" 1,000 metres", "1000", 1.0),
    (" -3", "-3", 1.0),
    (" 0.75", "3/4", 1.0),
    (" 3/4", "0.75", 1.0),
    (" 18", "19", 0.0),
    (" nineteen", "19", 0.0),
    (" 19.0000001", "19", 1.0),
    (" 19.01", "19", 0.0),
])
def test_number_extraction(completion, answer, reward):
    assert verify(num(answer), completion)[0] == reward


def test_number_tolerance_field():
    assert verify(num("100", tolerance=0.5), " 100.4")[0] == 1.0
    assert verify(num("100", tolerance=0.5), " 100.6")[0] == 0.0
    assert verify(num("19"), " 18")[1] == "expected 19, got 18"


@pytest.mark.parametrize("completion, reward", [
    (" Paris", 1.0),
    (" paris.", 1.0),
    (" Paris. It is also the largest city.", 1.0),
    (" The Paris", 1.0),
    (" Paris, Texas", 0.0),
    (" London", 0.0),
    ("", 0.0),
])
def test_text_extraction(completion, reward):
    assert verify(text(), completion)[0] == reward
