from __future__ import annotations

import random

import pytest

from tuneforge.eval.metrics import accuracy, exact_match, macro_f1, normalize_answer, per_skill_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  19. ", "19"),
        ('"Tamsk"', "Tamsk"),
        ('19."', "19"),
        ("\n\n  billing/refunds/double-charge\nUser: next question", "billing/refunds/double-charge"),
        ("m  a\tt", "m a t"),
        ("T A M", "T A M"),  # case is kept: uppercasing is a skill
        ("ｂｌｕｅ", "blue"),  # NFKC folds full-width letters
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_case_policy() -> None:
    assert exact_match(" 42.", "42")
    assert not exact_match("t a m", "T A M")
    assert exact_match("t a m", "T A M", lowercase=True)
    assert not exact_match("421", "42")


def test_accuracy() -> None:
    assert accuracy(["1", "2 ", "x"], ["1", "2", "3"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pair up"):
        accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="no references"):
        accuracy([], [])


def test_macro_f1_by_hand() -> None:
    refs = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "a"]
    # a: tp 1, fp 1, fn 1 -> 1/2; b: tp 1, fp 1 -> 2/3; c: fn 1 -> 0.  Mean 7/18.
    assert macro_f1(preds, refs) == pytest.approx(7 / 18)
    assert macro_f1(refs, refs) == 1.0


def test_macro_f1_unknown_predictions_are_errors_not_classes_with_labels() -> None:
    refs, preds = ["a", "b"], ["a", "zzz"]
    # Without a label set the stray string is a class of its own: a 1, b 0, zzz 0.
    assert macro_f1(preds, refs) == pytest.approx(1 / 3)
    # With one it is only a miss for b; c occurs nowhere and is skipped rather than scored 0.
    assert macro_f1(preds, refs, labels=["a", "b", "c"]) == pytest.approx(1 / 2)
    # A label predicted but never a reference counts (precision 0).
    assert macro_f1(["a", "c"], refs, labels=["a", "b", "c"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not in the label set"):
        macro_f1(["a"], ["q"], labels=["a"])


def test_macro_f1_normalises_like_exact_match() -> None:
    assert macro_f1(["billing/x/y.", " a "], ["billing/x/y", "a"]) == 1.0


def test_macro_f1_matches_sklearn_on_random_cases() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        classes = [f"c{i}" for i in range(rng.randint(2, 8))]
        refs = [rng.choice(classes) for _ in range(40)]
        preds = [r if rng.random() < 0.6 else rng.choice(classes) for r in refs]
        expected = sk.f1_score(refs, preds, average="macro", labels=sorted(set(refs) | set(preds)))
        assert macro_f1(preds, refs) == pytest.approx(expected)


def test_per_skill_accuracy() -> None:
    items = [
        {"answer": "3", "skill": "add"},
        {"answer": "T A M", "skill": "uppercase"},
        {"answer": "5", "skill": "add"},
        {"answer": "Rusk", "skill": "capital"},
    ]
    preds = ["3", "t a m", "4", "Rusk."]
    assert per_skill_accuracy(items, preds) == {"add": 0.5, "uppercase": 0.0, "capital": 1.0}
    assert list(per_skill_accuracy(items, preds)) == ["add", "uppercase", "capital"]
    with pytest.raises(ValueError, match="item 0"):
        per_skill_accuracy([{"answer": "1"}], ["1"])
