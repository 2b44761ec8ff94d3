"""The demo's report: a results table, one sentence read off the numbers, and two plots.

A table row is a dict::

    {"model": "base", "role": "base", "general_accuracy": 0.61, "domain_macro_f1": 0.01,
     "skills": {"add": 0.4, ...}}

``model`` is the display name; ``role`` (``base`` / ``domain_only`` / ``mixed``, optionally ``lora_mixed``) tells
the verdict which row is which (without roles, three rows are taken in that order); every other scalar is a column;
``skills`` (optional) holds per-skill general accuracy. The verdict is computed, never written in, so the
report says what this run measured even when that is "mixing did not help". The paired-bootstrap comparisons
behind its claims (:mod:`tuneforge.eval.bootstrap`) get a table of their own: how sure each difference is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.eval.bootstrap import Comparison
from tuneforge.eval.report import comparison_rows, fmt

ROLES = ("base", "domain_only", "mixed")
LORA_ROLE = "lora_mixed"  # LoRA on the mixed data: compared with full fine-tuning on the same mixture
HEADLINE = ("general_accuracy", "domain_macro_f1")
_HIDDEN = {"model", "role", "skills"}


def _columns(table: list[dict]) -> list[str]:
    cols: list[str] = []
    for row in table:
        for key, value in row.items():
            if key not in _HIDDEN and key not in cols and not isinstance(value, dict):
                cols.append(key)
    return cols


def _skills(table: list[dict]) -> list[str]:
    skills: list[str] = []
    for row in table:
        for skill in row.get("skills") or {}:
            if skill not in skills:
                skills.append(skill)
    return skills


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_table(table: list[dict]) -> str:
    """The results as aligned plain text for a terminal (headline columns, then per-skill accuracy)."""
    cols = _columns(table)
    out = _grid(["model", *cols], [[str(r["model"]), *(_cell(r.get(c)) for c in cols)] for r in table])
    skills = _skills(table)
    if skills:
        rows = [[s, *(_cell((r.get("skills") or {}).get(s)) for r in table)] for s in skills]
        out += "\n\n" + _grid(["skill", *(str(r["model"]) for r in table)], rows)
    return out


def _markdown(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A markdown table: the first ``left`` columns left-aligned, the rest (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _by_role(table: list[dict]) -> dict[str, dict]:
    rows = {r["role"]: r for r in table if r.get("role") in ROLES}
    if not rows and len(table) == len(ROLES):
        rows = dict(zip(ROLES, table))
    missing = [role for role in ROLES if role not in rows]
    if missing:
        raise ValueError(f"the report needs rows with role {missing} (or exactly three rows in order {ROLES})")
    return rows


def verdict(table: list[dict], margin: float = 0.02) -> str:
    """One sentence, read off the numbers: did mixing general data into fine-tuning preserve general skill?

    Differences smaller than ``margin`` (absolute accuracy) count as no difference: with a few hundred
    evaluation items, one or two answers either way is noise.
    """
    rows = _by_role(table)
    base, dom, mix = (rows[r]["general_accuracy"] for r in ROLES)
    f1_dom, f1_mix = rows["domain_only"]["domain_macro_f1"], rows["mixed"]["domain_macro_f1"]
    numbers = (
        f"general accuracy {base:.3f} (base) → {dom:.3f} (domain only) vs {mix:.3f} (mixed); "
        f"domain macro-F1 {f1_dom:.3f} (domain only) vs {f1_mix:.3f} (mixed)"
    )
    if mix - dom >= margin:
        if mix >= base - margin:
            head = "Mixing general data into fine-tuning preserved general skills"
        else:
            head = (
                "Mixing general data into fine-tuning preserved more general skill than domain-only fine-tuning, "
                "but not all of it"
            )
    elif dom - mix >= margin:
        head = "Mixing general data into fine-tuning did not preserve general skills: domain-only fine-tuning kept more"
    else:
        head = "Mixing general data into fine-tuning made no measurable difference to general skills"
    lora = next((r for r in table if r.get("role") == LORA_ROLE), None)
    return f"{head}: {numbers}." + ("" if lora is None else " " + _lora_sentence(lora, rows, margin))


def _lora_sentence(lora: dict, rows: dict[str, dict], margin: float) -> str:
    """LoRA against full fine-tuning on the same mixture: its share of the macro-F1, and what general skill it kept."""
    base, dom, g = rows["base"]["general_accuracy"], rows["domain_only"]["general_accuracy"], lora["general_accuracy"]
    f1, f1_full = lora["domain_macro_f1"], rows["mixed"]["domain_macro_f1"]
    share = f"{f1 / f1_full:.0%} of" if f1_full > 0 else "a macro-F1 against 0 for"
    if g >= base - margin:
        kept = "kept the base's general skills"
    elif g - dom >= margin:
        kept = "kept more general skill than domain-only fine-tuning, but not all of it"
    else:
        kept = "did not keep general skills"
    return (
        f"LoRA on the same mixture reached {share} full fine-tuning's domain macro-F1 ({f1:.3f} vs {f1_full:.3f}) "
        f"and {kept} (general accuracy {g:.3f})."
    )


def comparison_sentence(candidate: str, baseline: str, r: Comparison) -> str:
    """One paired comparison as a line: ``LoRA vs full: tickets macro_f1 Δ -0.012 (95% CI [...]): no detectable
    change``."""
    ci = f"[{fmt(r.low, True)}, {fmt(r.high, True)}]"
    return f"{candidate} vs {baseline}: {r.task} {r.metric} Δ {fmt(r.delta, True)} (95% CI {ci}): {r.verdict}"


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend: the report is written on headless machines too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_label(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def before_after_figure(table: list[dict]) -> Any:
    """The before/after bar chart: headline metrics per model, and per-skill general accuracy when given.

    Every bar carries its value as text, so a model that scores 0.0 shows "0.00" instead of a missing bar.
    """
    plt = _pyplot()
    skills = _skills(table)
    models = [str(r["model"]) for r in table]
    fig, axes = plt.subplots(1, 2 if skills else 1, figsize=(11 if skills else 5.5, 3.8), squeeze=False)
    panels = [(axes[0][0], list(HEADLINE), lambda r, k: r.get(k), "headline metrics")]
    if skills:
        panels.append((axes[0][1], skills, lambda r, k: (r.get("skills") or {}).get(k), "general accuracy per skill"))
    for ax, keys, get, heading in panels:
        width = 0.8 / max(1, len(table))
        for i, row in enumerate(table):
            values = [get(row, k) for k in keys]
            bars = ax.bar([x + i * width for x in range(len(keys))], [v or 0.0 for v in values], width, label=models[i])
            # Vertical text fits over the narrow per-skill bars without overlapping its neighbours.
            ax.bar_label(bars, labels=[_bar_label(v) for v in values], padding=2, fontsize=6, rotation=90)
        ax.set_xticks([x + width * (len(table) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels(keys, rotation=30 if len(keys) > 3 else 0, ha="right" if len(keys) > 3 else "center")
        ax.set_ylim(0, 1.2)  # headroom for the labels above a bar at 1.0
        ax.set_title(heading)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(
    run_dir: Path,
    table: list[dict],
    loss_curves: dict[str, list[tuple[int, float]]],
    title: str,
    comparisons: Sequence[tuple[str, str, Comparison]] = (),
    eval_report: Path | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``loss_curves.png`` and ``before_after.png`` into ``run_dir``; return their paths.

    ``comparisons``: ``(candidate, baseline, paired comparison)`` for the claims, shown with their intervals;
    ``eval_report``: tuneforge eval's full report (relative to ``run_dir``), linked from this one."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "report": run_dir / "report.md",
        "loss_curves": run_dir / "loss_curves.png",
        "before_after": run_dir / "before_after.png",
    }

    # Loss curves: one panel per run, since pre-training and fine-tuning losses live on different scales.
    names = list(loss_curves) or ["(no training)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = loss_curves.get(name, [])
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["loss_curves"], dpi=110)
    plt.close(fig)

    skills = _skills(table)
    models = [str(r["model"]) for r in table]
    fig = before_after_figure(table)
    fig.savefig(paths["before_after"], dpi=110)
    plt.close(fig)

    cols = _columns(table)
    rows = [[str(r["model"]), *(_cell(r.get(c)) for c in cols)] for r in table]
    parts = [f"# {title}", "", _markdown(["model", *cols], rows)]
    parts += ["", verdict(table)]
    if comparisons:
        header = ["comparison", "task", "metric", "candidate", "baseline", "Δ", "95% CI of Δ", "verdict"]
        rows = [[f"{c} vs {b}", *comparison_rows([r])[0]] for c, b, r in comparisons]
        parts += [
            "",
            "## How sure",
            "",
            "Paired bootstrap over the evaluation items (the same resamples for both models): the verdict is *better* "
            "or *worse* only when the 95 % interval of the difference excludes zero.",
            "",
            _markdown(header, rows, left=3),
        ]
    if eval_report is not None:
        parts += [
            "",
            f"Every fine-tune against the base, metric by metric and skill by skill: [{eval_report}]({eval_report}).",
        ]
    if skills:
        rows = [[s, *(_cell((r.get("skills") or {}).get(s)) for r in table)] for s in skills]
        parts += ["", "## General accuracy per skill", "", _markdown(["skill", *models], rows)]
    parts += [
        "",
        "## Loss",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Before and after",
        "",
        "![before and after](before_after.png)",
        "",
    ]
    paths["report"].write_text("\n".join(parts), encoding="utf-8")
    return paths
