from __future__ import annotations

import pytest

from tuneforge.demo.report import HEADLINE, before_after_figure, format_table, verdict, write_report


def _table(base: float, domain: float, mixed: float) -> list[dict]:
    return [
        {
            "model": "base",
            "role": "base",
            "general_accuracy": base,
            "domain_macro_f1": 0.004,
            "skills": {"add": base, "capital": base / 2},
        },
        {
            "model": "domain only",
            "role": "domain_only",
            "general_accuracy": domain,
            "domain_macro_f1": 0.71,
            "skills": {"add": domain, "capital": domain / 2},
        },
        {
            "model": "mixed 75/25",
            "role": "mixed",
            "general_accuracy": mixed,
            "domain_macro_f1": 0.66,
            "skills": {"add": mixed, "capital": mixed / 2},
        },
    ]


def _curves() -> dict[str, list[tuple[int, float]]]:
    return {
        "pretrain": [(s, 6.0 / (1 + s / 20)) for s in range(0, 300, 10)],
        "domain only": [(s, 3.0 / (1 + s / 10)) for s in range(0, 100, 5)],
        "mixed 75/25": [(s, 3.2 / (1 + s / 10)) for s in range(0, 100, 5)],
    }


def test_report_files_exist_and_pngs_are_valid(tmp_path) -> None:
    from PIL import Image

    paths = write_report(tmp_path / "run", _table(0.6, 0.2, 0.55), _curves(), "Demo: tickets")
    assert set(paths) == {"report", "loss_curves", "before_after"}
    for key in ("loss_curves", "before_after"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(paths[key]) as image:
            image.verify()
        with Image.open(paths[key]) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    md = paths["report"].read_text(encoding="utf-8")
    assert md.startswith("# Demo: tickets")
    assert "| domain only | 0.200 | 0.710 |" in md
    assert "![loss curves](loss_curves.png)" in md and "![before and after](before_after.png)" in md
    assert "## General accuracy per skill" in md and "| capital | 0.300 | 0.100 | 0.275 |" in md


def test_sentence_flips_when_the_numbers_flip(tmp_path) -> None:
    kept = write_report(tmp_path / "a", _table(0.6, 0.2, 0.59), _curves(), "t")["report"].read_text()
    lost = write_report(tmp_path / "b", _table(0.6, 0.59, 0.2), _curves(), "t")["report"].read_text()
    assert "Mixing general data into fine-tuning preserved general skills" in kept
    assert "did not preserve" not in kept
    assert "did not preserve general skills" in lost
    assert "preserved general skills" not in lost


def test_verdict_partial_and_no_difference() -> None:
    partial = verdict(_table(0.6, 0.1, 0.4))
    assert "preserved more general skill than domain-only fine-tuning, but not all of it" in partial
    assert "0.600 (base) → 0.100 (domain only) vs 0.400 (mixed)" in partial
    same = verdict(_table(0.6, 0.3, 0.31))
    assert "made no measurable difference" in same
    assert "preserved" in verdict(_table(0.6, 0.3, 0.31), margin=0.005)


def test_verdict_uses_row_order_without_roles_and_rejects_incomplete_tables() -> None:
    rows = [{k: v for k, v in r.items() if k != "role"} for r in _table(0.6, 0.2, 0.55)]
    assert "preserved more general skill" in verdict(rows)
    with pytest.raises(ValueError, match="role"):
        verdict(rows[:2])


def test_format_table_is_aligned_plain_text() -> None:
    text = format_table(_table(0.6, 0.2, 0.55))
    lines = text.splitlines()
    assert lines[0].split() == ["model", "general_accuracy", "domain_macro_f1"]
    assert len({len(line) for line in lines[:5]}) == 1  # header, rule and rows line up
    assert "0.550" in text and "skill" in text and "capital" in text
    assert "\x1b" not in text  # no terminal escapes: the CLI may add colour itself


def test_report_with_empty_curves_and_no_skills(tmp_path) -> None:
    table = [{k: v for k, v in r.items() if k != "skills"} for r in _table(0.5, 0.1, 0.4)]
    paths = write_report(tmp_path, table, {}, "no curves")
    assert paths["loss_curves"].stat().st_size > 0
    assert "per skill" not in paths["report"].read_text()


def _labels_by_bar(ax) -> dict[tuple[int, int], str]:
    """(model index, bar index) -> the text anchored at that bar's top, from the Axes' annotations."""
    anchors = {(round(t.xy[0], 6), round(t.xy[1], 6)): t.get_text() for t in ax.texts}
    assert len(anchors) == len(ax.texts)  # one label per bar, none stacked on another
    out = {}
    for i, container in enumerate(ax.containers):
        for j, bar in enumerate(container):
            key = (round(bar.get_x() + bar.get_width() / 2, 6), round(bar.get_height(), 6))
            out[i, j] = anchors.pop(key)
    assert not anchors, f"labels that belong to no bar: {anchors}"
    return out


def test_every_bar_is_labelled_with_its_value_and_zero_shows_as_zero() -> None:
    import matplotlib.pyplot as plt

    table = _table(0.81, 0.0, 0.9)  # domain-only forgot everything: its bars have zero height
    fig = before_after_figure(table)
    try:
        headline, per_skill = fig.axes[:2]
        labels = _labels_by_bar(headline)
        assert labels == {(i, j): f"{row[key]:.2f}" for i, row in enumerate(table) for j, key in enumerate(HEADLINE)}
        assert labels[1, 0] == "0.00"  # the bar that used to be invisible
        skills = list(table[0]["skills"])
        assert _labels_by_bar(per_skill) == {
            (i, j): f"{row['skills'][s]:.2f}" for i, row in enumerate(table) for j, s in enumerate(skills)
        }
    finally:
        plt.close(fig)


def test_a_missing_value_is_labelled_as_missing_not_as_zero() -> None:
    import matplotlib.pyplot as plt

    table = _table(0.6, 0.2, 0.5)
    del table[2]["domain_macro_f1"]
    for row in table:
        row.pop("skills")
    fig = before_after_figure(table)
    try:
        assert len(fig.axes) == 1  # no skills: no per-skill panel
        labels = _labels_by_bar(fig.axes[0])
        assert labels[2, HEADLINE.index("domain_macro_f1")] == "n/a"
        assert labels[2, HEADLINE.index("general_accuracy")] == "0.50"
    finally:
        plt.close(fig)
