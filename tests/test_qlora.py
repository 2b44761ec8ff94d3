"""QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, on the CPU too), LoRA trained on top, an adapter that loads
onto the plain base, merging into the full-precision weights, resume, and the planner's 4-bit weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.config import load_recipe
from tuneforge.errors import RecipeError
from tuneforge.planning.memory import NF4_BYTES, NF4_TENSOR_BYTES
from tuneforge.planning.workload import memory, policy_shape
from tuneforge.training.build import build_model

from conftest import base_recipe, reverse_task, write_jsonl

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def qlora(tiny_model: Path, tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(80))
    raw = base_recipe(tiny_model, data, tmp_path / "run", max_steps=12, lr=1e-2, precision="fp32")
    raw["adapter"] = {"kind": "qlora", "r": 8}
    return raw


def _base_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers LoRA wraps, by name: the base layer inside each PEFT LoRA layer."""
    return {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


def test_the_base_loads_in_4bit_nf4_and_only_lora_trains(qlora: dict) -> None:
    model = build_model(load_recipe(qlora), torch.device("cpu"))
    linears = _base_linears(model)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    for name, layer in linears.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, name  # NF4 with double-quantised absmax
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == layer.in_features * layer.out_features // 2
        assert not layer.weight.requires_grad
    # the output head and the embeddings stay in full precision (as in the QLoRA paper)
    base = model.get_base_model()
    assert base.lm_head.weight.dtype == torch.float32 and not isinstance(base.lm_head, bnb.nn.Linear4bit)
    assert base.get_input_embeddings().weight.dtype == torch.float32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_the_4bit_state_round_trips(qlora: dict) -> None:
    """An elastic replica heals from a peer's ``state_dict``: the 4-bit layers' tables must load back."""
    recipe = load_recipe(qlora)
    a, b = build_model(recipe, torch.device("cpu")), build_model(recipe, torch.device("cpu"))
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "lora_B" in n:
                p.normal_()
        layer = _base_linears(a)["base_model.model.model.layers.0.mlp.up_proj"]
        layer.weight.quant_state.absmax.mul_(2)  # so that loading visibly copies the tables
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits)


def test_an_evaluation_pass_does_not_change_the_gradients(qlora: dict) -> None:
    """bitsandbytes would repack a 4-bit weight for its CPU inference kernel on the first no-grad eval pass; the
    repacked layer has no backward, so training after a validation pass would lose the base's input gradients."""
    ids = torch.randint(0, 300, (2, 16))

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    qlora["adapter"]["dropout"] = 0.0
    recipe = load_recipe(qlora)
    model = build_model(recipe, torch.device("cpu"))
    with torch.no_grad():  # make lora_B non-zero, so every LoRA layer's input gradient matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    before = grads(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads(model)
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # the 4-bit matmuls compute in the run's precision
def test_a_qlora_run_learns_and_saves_an_adapter_for_the_plain_base(
    qlora: dict, tiny_model: Path, precision: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    qlora["output"]["merge"] = True
    qlora["train"]["precision"] = precision
    result = tuneforge.train(qlora, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.3, losses
    # the adapter is a standard PEFT LoRA that loads onto the unquantised base, as QLoRA users expect
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(plain, str(result.output_dir)).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the trained adapter changes the model
    # merged into the full-precision base — not into dequantised 4-bit weights
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    name = "model.layers.0.mlp.down_proj.weight"
    lora = loaded.base_model.model.model.layers[0].mlp.down_proj
    delta = lora.get_delta_weight("default")
    torch.testing.assert_close(merged.state_dict()[name], fresh.state_dict()[name] + delta, atol=1e-6, rtol=0)


def test_qlora_with_gradient_checkpointing_and_resume(qlora: dict, tmp_path: Path) -> None:
    qlora["train"].update(max_steps=6, checkpoint_every=3, gradient_checkpointing=True)
    whole = tuneforge.train(qlora, progress=False)
    resumed_recipe = base_recipe(
        Path(qlora["model"]["path"]), Path(qlora["data"]["sources"][0]["path"]), tmp_path / "b"
    )
    resumed_recipe.update(adapter=qlora["adapter"], train=qlora["train"])
    resumed = tuneforge.train(resumed_recipe, progress=False, resume=whole.run_dir / "checkpoints" / "step-0000003")
    a = [h["loss"] for h in whole.history if h["step"] > 3]
    b = [h["loss"] for h in resumed.history if h["step"] > 3]
    assert a and a == pytest.approx(b, rel=1e-5)


def test_the_forecast_counts_4bit_weights(qlora: dict) -> None:
    """The weights term is the 4-bit decoder plus full-precision embeddings, norms and head — and it matches the
    bytes the loaded model really holds (packed weights, absmax and double-quantisation tables)."""
    recipe = load_recipe(qlora)
    shape = policy_shape(recipe)
    kw = dict(micro=8, grad_accumulation=1, gradient_checkpointing=False, precision="fp32")
    q = memory(recipe, shape, **kw).parts["weights"]
    lora_recipe = load_recipe({**qlora, "adapter": {**qlora["adapter"], "kind": "lora"}})
    full = memory(lora_recipe, shape, **kw).parts["weights"]
    adapter = full - shape.params * 4
    quantized = shape.decoder_matmul_params
    tables = len(shape.linears) * NF4_TENSOR_BYTES
    assert q - adapter == pytest.approx((shape.params - quantized) * 4 + quantized * NF4_BYTES + tables, abs=1)
    assert 0.5 < NF4_BYTES < 0.52  # ~4.1 bits a weight: the nibble and the double-quantised absmax
    assert q < 0.45 * full
    model = build_model(recipe, torch.device("cpu"))
    storages: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for layer in _base_linears(model).values():
        s = layer.weight.quant_state
        for t in (s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    measured = sum(storages.values())
    assert q == pytest.approx(measured, rel=0.05)


def test_missing_bitsandbytes_and_unsupported_devices_are_explained(
    qlora: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneforge.models.adapters import check_qlora_supported

    with pytest.raises(RecipeError, match="runs on cpu or cuda"):
        check_qlora_supported("mps")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(tuneforge.api.TuneforgeError, match=r"needs bitsandbytes: pip install 'tuneforge\[qlora\]'"):
        tuneforge.train(qlora, progress=False)
