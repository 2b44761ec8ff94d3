"""The demo end to end (quick size): trains, evaluates, reports, tracks, registers — and caches."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cached_second_run(_isolated_home: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tuneforge.demo.run import MIXED_MODEL_NAME, run_demo
    from tuneforge.paths import default_tracking_uri

    first = run_demo(quick=True)
    assert [row["role"] for row in first["table"]] == ["base", "domain_only", "mixed"]
    for row in first["table"]:
        assert 0.0 <= row["general_accuracy"] <= 1.0 and 0.0 <= row["domain_macro_f1"] <= 1.0
        assert row["skills"]
    run_dir = Path(first["run_dir"])
    for name in ("report.md", "loss_curves.png", "before_after.png", "table.json"):
        assert (run_dir / name).stat().st_size > 0
    assert (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not first["base_cached"]
    mix = first["mix"]
    assert mix["names"] == ["tickets", "general"]
    assert abs(mix["realised"][0] - 0.75) < 0.1  # a 10-step run: within a few examples of the target

    client = MlflowClient(default_tracking_uri())
    version = client.get_model_version(MIXED_MODEL_NAME, first["mixed_version"])
    assert version.tags["method"] == "sft" and "recipe_hash" in version.tags
    assert any(k.startswith("data_hash.") for k in version.tags)

    second = run_demo(quick=True)
    assert second["base_cached"]
    assert all(second["token_cache_hits"].values())
    assert int(second["mixed_version"]) == int(first["mixed_version"]) + 1
