from __future__ import annotations

import pytest

from tuneforge.demo.report import format_table, verdict, write_report


def _table(base: float, domain: float, mixed: float) -> list[dict]:
    return [
        {"model": "base", "role": "base", "general_accuracy": base, "domain_macro_f1": 0.004,
         "skills": {"add": base, "capital": base / 2}},
        {"model": "domain only", "role": "domain_only", "general_accuracy": domain, "domain_macro_f1": 0.71,
         "skills": {"add": domain, "capital": domain / 2}},
        {"model": "mixed 75/25", "role": "mixed", "general_accuracy": mixed, "domain_macro_f1": 0.66,
         "skills": {"add": mixed, "capital": mixed / 2}},
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
