"""``tuneforge plan RECIPE [--hardware cpu|cuda:80GB|cpu:16GB|cuda:80GBx8] [--calibrate] [--json] [--set k=v]``.

Validates and tokenizes the data (through the token cache, as ``train`` would), resolves every ``auto`` for the
hardware, and prints each value with its reason and the forecast. No model weights are loaded unless
``--calibrate`` times a few real steps on this machine (cached, so the next plan and forecast use it).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument(
        "--hardware",
        default=None,
        metavar="SPEC",
        help="plan for this hardware instead of this machine: cpu, cpu:16GB, cuda:80GB, cuda:80GBx8 (8 replicas)",
    )
    p.add_argument("--calibrate", action="store_true", help="time a few real steps here first (cached per shape)")
    p.add_argument("--json", action="store_true", help="print the plan and forecast as JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from tuneforge.config import load_recipe
    from tuneforge.errors import TuneforgeError
    from tuneforge.models.refs import resolve_recipe_model
    from tuneforge.planning.forecast import make_forecast, render
    from tuneforge.planning.hardware import parse_hardware
    from tuneforge.planning.resolve import resolve
    from tuneforge.training.build import prepare

    recipe = load_recipe(args.recipe, args.set)
    recipe = resolve_recipe_model(recipe)
    hardware = parse_hardware(args.hardware, recipe.train.device)
    prepared = prepare(recipe)
    res = resolve(recipe, prepared.num_steps, hardware=hardware, prepared=prepared)
    calibration = None
    if args.calibrate:
        if not hardware.local:
            raise TuneforgeError(f"--calibrate times steps on this machine; --hardware {args.hardware} is not it")
        from tuneforge.planning.calibrate import calibrate

        calibration = calibrate(res.apply(recipe), res, prepared)
    forecast = make_forecast(res.apply(recipe), res, hardware, prepared)
    if args.json:
        out = {"resolved": res.as_dict(), "forecast": forecast.as_dict()}
        if calibration is not None:
            out["calibration"] = {"step_s": calibration.step_s}
        print(json.dumps(out, indent=2))
    else:
        print(render(forecast, recipe, res))
    return 0 if forecast.fits else 1
