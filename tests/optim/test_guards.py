"""optim/guards.py: what a proposed prompt must not copy."""
from __future__ import annotations

from autodiff_cli.optim.guards import (
    COPY_WORDS,
    copied_span,
    diagnosis_of,
    shared_run,
    words,
)


def test_a_run_of_six_words_from_one_source_is_a_copy_and_five_is_not():
    sources = {"example q1's question": "Who directed the film that won the 1998 award?"}
    assert copied_span("Ask: who directed the film that won it?", sources) == \
        ("example q1's question", "who directed the film that won")
    assert copied_span("Ask who directed the film first.", sources) is None  # 5 words
    assert COPY_WORDS == 6


def test_case_and_punctuation_do_not_hide_a_copy_and_current_values_are_allowed():
    sources = {"d": "The model counted the pear twice, because it came last."}
    assert copied_span("THE MODEL -- counted the pear twice!", sources) == ("d", "the model counted the pear twice")
    assert copied_span("the model counted the pear twice", sources,
                       ignore=["Note: the model counted the pear twice."]) is None


def test_the_diagnosis_is_found_in_a_gradient_text():
    assert diagnosis_of("Add a rule. (Diagnosis: It summed twice.)") == "It summed twice."
    assert diagnosis_of("Diagnosis: It summed twice.") == "It summed twice."
    assert diagnosis_of("Add a rule.") is None


def test_shared_run_and_words():
    assert words("Don't STOP_now!") == ["don", "t", "stop", "now"]
    grams = {("a", "b", "c")}
    assert shared_run("x a b c y", grams, 3) == "a b c"
    assert shared_run("x a b c y", grams, 3, allowed=grams) is None


def test_a_copy_is_quoted_whole_and_never_spans_two_sentences():
    from autodiff_cli.optim.guards import copied_run, text_ngrams

    question = "I have two apples and a pear. How many fruits do I have?"
    grams = text_ngrams(question, COPY_WORDS)
    assert copied_run("Count. For example: I have two apples and a pear. How many?", grams, COPY_WORDS) == \
        "i have two apples and a pear"
    # the words across the sentence end ("a pear how many fruits") are no run of the question's
    assert copied_run("Think of a pear: how many fruits do you see", grams, COPY_WORDS) is None
    already = text_ngrams("Example: I have two apples and a pear.", COPY_WORDS)
    assert copied_run("For example: I have two apples and a pear. How many?", grams, COPY_WORDS, already) is None
