"""The evaluation report: a table (markdown and terminal), a PNG chart with every value written on it, and JSON.

Against a baseline, each row is one metric of one task: the candidate, the baseline, the difference, its paired
bootstrap 95 % interval and the verdict read off that interval. Without one, each row is a value and its interval.
``report.json`` holds every model's full results (per-item statistics included), so ``tuneforge compare`` can put
any saved reports side by side later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError
from tuneforge.eval.bootstrap import BETTER, WORSE, Comparison, Interval
from tuneforge.eval.results import ModelResults
from tuneforge.files import atomic_write

FORMAT = "tuneforge-eval-report/1"
MAX_PANELS = 32
_COLORS = {BETTER: "#2e7d32", WORSE: "#c62828"}
_NEUTRAL, _BASE = "#78909c", "#b0bec5"


@dataclass
class Report:
    """Models and what was measured: ``comparisons[label]`` against ``baseline``, or ``intervals`` without one."""

    title: str
    candidates: list[ModelResults]
    baseline: ModelResults | None = None
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)
    intervals: dict[str, dict[tuple[str, str], Interval]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "title": self.title,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "comparisons": {k: [r.to_dict() for r in rows] for k, rows in self.comparisons.items()},
            "intervals": {
                k: [{"task": t, "metric": m, **_clean(vars(i))} for (t, m), i in v.items()]
                for k, v in self.intervals.items()
            },
            "notes": self.notes,
        }


def load_report(path: Path) -> Report:
    """A ``report.json`` written by :func:`write_report` (models and comparisons, not the chart)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TuneforgeError(f"{path}: cannot read the evaluation report: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise TuneforgeError(f"{path}: not a tuneforge evaluation report (expected format {FORMAT!r})")
    baseline = ModelResults.from_dict(d["baseline"], str(path)) if d.get("baseline") else None
    comparisons = {
        k: [
            Comparison(**{**r, **{x: _nan(r[x]) for x in ("low", "high", "delta", "candidate", "baseline")}})
            for r in rows
        ]
        for k, rows in d.get("comparisons", {}).items()
    }
    return Report(
        d.get("title", ""),
        [ModelResults.from_dict(c, str(path)) for c in d.get("candidates", [])],
        baseline,
        comparisons,
        notes=list(d.get("notes", [])),
    )


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def fmt(v: float | None, signed: bool = False) -> str:
    """Numbers as people read metrics: 3 decimals below 10, 1 above (perplexity 31.4, BLEU 23.7)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    digits = 3 if abs(v) < 10 else 1
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def comparison_rows(rows: Sequence[Comparison]) -> list[list[str]]:
    return [[r.task, r.metric, fmt(r.candidate), fmt(r.baseline), fmt(r.delta, True), _ci(r), r.verdict] for r in rows]


def _ci(r: Comparison | Interval) -> str:
    if not (math.isfinite(r.low) and math.isfinite(r.high)):
        return "–"
    signed = isinstance(r, Comparison)
    return f"[{fmt(r.low, signed)}, {fmt(r.high, signed)}]"


def _sections(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, rows) for each table of the report."""
    out = []
    if report.baseline is not None:
        for c in report.candidates:
            header = ["task", "metric", c.label, report.baseline.label, "Δ", "95% CI of Δ", "verdict"]
            out.append(
                (f"{c.label} vs {report.baseline.label}", header, comparison_rows(report.comparisons.get(c.label, [])))
            )
    else:
        for c in report.candidates:
            ints = report.intervals.get(c.label, {})
            rows = [[t, m, fmt(i.value), _ci(i)] for (t, m), i in ints.items()]
            out.append((c.label, ["task", "metric", "value", "95% CI"], rows))
    return out


def markdown(report: Report, chart: str | None = None) -> str:
    parts = [f"# {report.title}", ""]
    for heading, header, rows in _sections(report):
        if len(report.candidates) > 1:  # one table: the title says it all
            parts += [f"## {heading}", ""]
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 3) + ["---"]) + "|")
        parts += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("")
    if report.baseline is not None:
        parts += [
            "Δ is candidate − baseline; the interval is a paired bootstrap over items (same resamples for both "
            "models); the verdict is *better* or *worse* only when the interval excludes zero.",
            "",
        ]
    if report.notes:
        parts += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    if chart:
        parts += [f"![results]({chart})", ""]
    return "\n".join(parts)


def text(report: Report) -> str:
    """The tables, aligned for a terminal."""
    out = [report.title]
    for heading, header, rows in _sections(report):
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

        def line(cells: list[str], widths: list[int] = widths) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 or i == len(cells) - 1 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )

        titled = len(report.candidates) > 1  # one table: the title says it all
        out += [
            "",
            *([heading] if titled else []),
            line(header),
            "  ".join("-" * w for w in widths),
            *(line(r) for r in rows),
        ]
    out += [f"note: {n}" for n in report.notes]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- chart


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # file-only backend: reports are written on headless machines
    import matplotlib.pyplot as plt

    return plt


def figure(report: Report) -> Any:
    """One small bar chart per (task, metric): each model's value written on its bar; the candidate's colour is
    its verdict (green better, red worse, grey no detectable change) and the title says Δ and its interval."""
    plt = _pyplot()
    panels = _panels(report)
    cols = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (task, metric, bars, subtitle) in zip(axes.flat, panels):
        labels = [b[0] for b in bars]
        values = [b[1] for b in bars]
        shown = [0.0 if not math.isfinite(v) else v for v in values]
        drawn = ax.bar(range(len(bars)), shown, color=[b[2] for b in bars], width=0.6)
        ax.bar_label(drawn, labels=[fmt(v) for v in values], padding=2, fontsize=8)
        if all(0.0 <= v <= 1.0 for v in shown):  # rates and scores: the whole [0, 1] scale, room for the labels
            ax.set_ylim(0, 1.18)
        else:
            ax.set_ylim(min(0.0, min(shown) * 1.25), max(abs(v) for v in shown) * 1.3)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(labels, fontsize=7, rotation=15 if len(bars) > 2 else 0)
        ax.set_title(f"{task} · {metric}\n{subtitle}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(report.title, fontsize=10)
    fig.tight_layout()
    return fig


def _panels(report: Report) -> list[tuple[str, str, list[tuple[str, float, str]], str]]:
    out = []
    if report.baseline is not None:
        by_key: dict[tuple[str, str], list[tuple[str, Comparison]]] = {}
        for c in report.candidates:
            for r in report.comparisons.get(c.label, []):
                by_key.setdefault((r.task, r.metric), []).append((c.label, r))
        for (task, metric), entries in by_key.items():
            bars = [(report.baseline.label, entries[0][1].baseline, _BASE)]
            bars += [(label, r.candidate, _COLORS.get(r.verdict, _NEUTRAL)) for label, r in entries]
            subtitle = "; ".join(
                f"Δ {fmt(r.delta, True)} {_ci(r)}" + (f" {r.verdict}" if len(entries) == 1 else "") for _, r in entries
            )
            out.append((task, metric, bars, subtitle))
    else:
        keys = list(dict.fromkeys(k for c in report.candidates for k in report.intervals.get(c.label, {})))
        for task, metric in keys:
            bars, subtitle = [], []
            for c in report.candidates:
                i = report.intervals.get(c.label, {}).get((task, metric))
                if i is not None:
                    bars.append((c.label, i.value, _NEUTRAL))
                    subtitle.append(_ci(i))
            out.append((task, metric, bars, "95% CI " + "; ".join(subtitle)))
    if len(out) > MAX_PANELS:  # headline metrics first; per-group ones (metric/group) only while they fit
        headline = [p for p in out if "/" not in p[1]]
        out = (headline + [p for p in out if "/" in p[1]])[:MAX_PANELS]
        report.notes.append(f"the chart shows {MAX_PANELS} of the metrics; the table has them all")
    return out


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """``report.md``, ``report.png`` and ``report.json`` in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "chart": out_dir / "report.png", "json": out_dir / "report.json"}
    plt = _pyplot()
    fig = figure(report)
    fig.savefig(paths["chart"], dpi=110)
    plt.close(fig)
    atomic_write(paths["markdown"], markdown(report, chart=paths["chart"].name))
    atomic_write(paths["json"], json.dumps(report.to_dict(), indent=1, ensure_ascii=False, default=str))
    paths["summary"] = atomic_write(out_dir / "summary.json", json.dumps(summary(report), indent=1, ensure_ascii=False))
    return paths


def summary(report: Report) -> dict[str, Any]:
    """The first candidate's numbers by ``task/metric`` — scalars only, for registry tags and quick reading."""
    if not report.candidates:
        return {}
    c = report.candidates[0]
    out: dict[str, Any] = {
        "model": c.label,
        "baseline": report.baseline.label if report.baseline else None,
        "metrics": {},
    }
    if report.baseline is not None:
        for r in report.comparisons.get(c.label, []):
            out["metrics"][f"{r.task}/{r.metric}"] = _clean(
                {
                    "value": r.candidate,
                    "baseline": r.baseline,
                    "delta": r.delta,
                    "ci_low": r.low,
                    "ci_high": r.high,
                    "verdict": r.verdict,
                }
            )
    else:
        for (t, m), i in report.intervals.get(c.label, {}).items():
            out["metrics"][f"{t}/{m}"] = _clean({"value": i.value, "ci_low": i.low, "ci_high": i.high})
    return out


def table_columns(report: Report) -> dict[str, list[Any]]:
    """The comparison as columns (MLflow's ``log_table`` shape), one row per model, task and metric."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "model",
            "baseline",
            "task",
            "metric",
            "value",
            "baseline_value",
            "delta",
            "ci_low",
            "ci_high",
            "verdict",
            "n",
        )
    }
    for c in report.candidates:
        for r in report.comparisons.get(c.label, []):
            for k, v in zip(
                cols,
                (
                    c.label,
                    report.baseline.label if report.baseline else "",
                    r.task,
                    r.metric,
                    r.candidate,
                    r.baseline,
                    r.delta,
                    r.low,
                    r.high,
                    r.verdict,
                    r.n,
                ),
            ):
                cols[k].append(None if isinstance(v, float) and not math.isfinite(v) else v)
        if report.baseline is None:
            for (t, m), i in report.intervals.get(c.label, {}).items():
                for k, v in zip(cols, (c.label, "", t, m, i.value, None, None, i.low, i.high, "", c.tasks[t].n)):
                    cols[k].append(None if isinstance(v, float) and not math.isfinite(v) else v)
    return cols
