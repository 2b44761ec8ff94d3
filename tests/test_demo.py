"""The demo end to end (quick size): trains, evaluates, reports, tracks, registers — and caches."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cached_second_run(_isolated_home: Path, tmp_path: Path) -> None:
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

    _check_kept_mixed_model(Path(first["mixed_dir"]), _isolated_home)
    _check_every_shipped_recipe_runs_on_the_demo(_isolated_home, tmp_path)

    second = run_demo(quick=True)
    assert second["base_cached"]
    assert all(second["token_cache_hits"].values())
    assert int(second["mixed_version"]) == int(first["mixed_version"]) + 1
    assert second["mixed_dir"] == first["mixed_dir"] and not (Path(second["mixed_dir"]).parent / "mixed.tmp").exists()


def _check_kept_mixed_model(mixed: Path, home: Path) -> None:
    """The mixed model is kept, whole, at a fixed path that recipes (the distillation teacher) can name."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert mixed == home / "demo" / "quick" / "mixed"
    run_output = sorted(home.glob("runs/demo-*/mixed/model"))[-1]
    kept, trained = load_file(str(mixed / "model.safetensors")), load_file(str(run_output / "model.safetensors"))
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)
    model = AutoModelForCausalLM.from_pretrained(mixed)
    tokenizer = AutoTokenizer.from_pretrained(mixed)
    ids = tokenizer("Hello, my parcel does not work.", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def _check_every_shipped_recipe_runs_on_the_demo(home: Path, tmp: Path) -> None:
    """Every recipe in recipes/ runs two steps on what the demo built (its quick size), in dependency order."""
    import math

    import tuneforge
    from tuneforge.data.validate import validate_file

    data = home / "demo" / "quick" / "data"
    assert validate_file(data / "tickets_preferences.jsonl", "preference").ok
    assert validate_file(data / "tickets_prompts.jsonl", "prompt", allow_extra="*").ok
    shipped = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    order = {"reward": 0, "ppo": 1}  # ppo reads the reward model that recipes/reward.yaml writes
    shipped.sort(key=lambda p: order.get(p.stem, -1))
    assert {p.stem for p in shipped} >= {"sft-lora", "sft-full", "cpt", "dpo", "reward", "grpo", "ppo", "distill"}
    for path in shipped:
        quick = tmp / path.name  # the same recipe, pointed at the quick demo
        quick.write_text(path.read_text().replace("demo/full/", "demo/quick/"))
        sets = ["train.max_steps=2", "train.eval_every=2", "train.global_batch_size=4", "tracking.enabled=false",
                "data.max_length=128", "train.checkpoint_every=null"]
        if path.stem != "reward":
            sets.append(f"output.dir={home / 'runs' / path.stem}")
        result = tuneforge.train(quick, progress=False, set=sets)
        assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history), path.name
        assert result.evals, path.name
        if path.stem in ("dpo", "reward"):
            assert 0.0 <= result.evals[-1]["val/accuracy"] <= 1.0  # held-out pairs were scored
