"""LoRA adapters for a served base: checked when registered, loaded on first use, evicted least-recently-used.

An adapter is a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), as tuneforge
and plain ``peft`` save them. Registering reads only the config and the safetensors header, so a bad adapter
is refused before any request needs it: another base model (by name, config or layer shapes), a layer the
base lacks, or a PEFT option that changes a layer's forward beyond ``base + scale·B·A`` (and DoRA's
magnitude), each named with the reason. ``modules_to_save`` is served for the input embedding and the LM head
(a tied head follows the trained embedding when PEFT's ``ensure_weight_tying`` is set, as PEFT does on load):
``vocab.py`` gives each row its adapter's tables. Weights are read when a request first needs them and live in the
:class:`~tuneforge.serve.lora.LoraBank`'s slots; under a byte budget the least recently used adapter that no
running request holds and nobody pinned makes room.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ModelError, suggest
from tuneforge.serve.lora import LayerDelta, LoraBank, base_linear, unwrap
from tuneforge.serve.vocab import VocabTables, vocab_names

PREFIX = "base_model.model."
A_KEY, B_KEY, MAG_KEY = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
# PEFT options (beyond DoRA) that change what a layer computes: served any other way, the answers would be wrong.
FORWARD_CHANGING = (
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
)
# LoRA variants PEFT tags in LoraConfig's metadata that are served as plain LoRA: DoRA (handled in lora.py) and
# VeLoRA (it only changes the backward pass).
SERVED_VARIANTS = ("use_dora", "velora_config")
# Config fields that must agree for an adapter trained on another copy of the base to fit this one.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


class AdapterError(ModelError):
    """An adapter that cannot be served on this engine's base; the message says why."""


class UnknownAdapterError(AdapterError):
    """No adapter of that name is registered."""


@dataclass(frozen=True)
class AdapterInfo:
    """What registering an adapter checked: its layers ``{name: (rank, in, out)}``, size and kind."""

    name: str
    path: Path
    layers: dict[str, tuple[int, int, int]]
    scales: dict[str, float]
    dora: bool
    nbytes: int
    base: str | None
    embed_key: str | None = None  # the tensor holding the adapter's own input embedding table, if it has one
    head_key: str | None = None  # …its own LM head (the embedding's tensor when the head is tied to it)


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter's weights as read from disk: LoRA deltas by layer, and its own vocabulary tables if any."""

    layers: dict[str, LayerDelta]
    embed: torch.Tensor | None = None  # [vocab, hidden]
    head: torch.Tensor | None = None  # [vocab, hidden]; ``embed`` itself for a tied head


def inspect_adapter(name: str, path: str | Path, model: nn.Module, base_path: Path) -> AdapterInfo:
    """Check that the adapter at ``path`` fits ``model`` and can be served in a shared batch (no weights read)."""
    from peft import LoraConfig, PeftConfig
    from safetensors import safe_open

    root = Path(path).expanduser()
    config_file, weights = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_file.is_file():
        raise AdapterError(f"adapter {name}: {root} is not a PEFT adapter directory (expected {config_file.name})")
    if not weights.is_file():
        raise AdapterError(f"adapter {name}: {weights} is missing (expected the adapter's weights in safetensors)")
    try:
        raw = json.loads(config_file.read_text())
        config = PeftConfig.from_pretrained(str(root))
    except (ValueError, TypeError, OSError) as e:
        raise AdapterError(f"adapter {name}: {config_file}: {e}") from None
    if not isinstance(config, LoraConfig) or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise AdapterError(
            f"adapter {name}: {config_file}: peft_type {raw.get('peft_type')!r} cannot share a batch with other "
            "adapters (expected LORA; prompt/prefix tuning changes the input, not the layers — serve it alone with "
            "peft, or train a LoRA adapter)"
        )
    embed_name, head_name = vocab_names(model)
    _check_options(name, config_file, config, embed_name, head_name)
    base = config.base_model_name_or_path
    _check_base(name, config_file, base, base_path, model)

    layers: dict[str, tuple[int, int, int]] = {}
    magnitudes: set[str] = set()
    with safe_open(str(weights), framework="pt") as f:
        names = f.keys()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    tables = {
        kind: PREFIX + module + ".weight"
        for kind, module in (("embed", embed_name), ("head", head_name))
        if module is not None and PREFIX + module + ".weight" in shapes
    }
    for kind, key in tables.items():
        _check_table(name, weights, kind, key, shapes.pop(key), model, embed_name if kind == "embed" else head_name)
    for key, shape in sorted(shapes.items()):
        module, kind = _split_key(name, weights, key)
        if kind == MAG_KEY:
            magnitudes.add(module)
            continue
        if kind == B_KEY:
            continue
        b_shape = shapes.get(PREFIX + module + B_KEY)
        if b_shape is None:
            raise AdapterError(f"adapter {name}: {weights}: {key} has no matching {module + B_KEY}")
        layer = base_linear(model, module)
        if not isinstance(layer, nn.Linear):
            what = "no such layer" if layer is None else f"a {type(layer).__name__}, not a Linear layer"
            raise AdapterError(
                f"adapter {name}: {weights}: {module}: the base has {what} (expected an adapter trained on this "
                "base; LoRA on embeddings or convolutions is not served in shared batches — merge it instead)"
            )
        (r, fan_in), (fan_out, r_b) = shape, b_shape
        if (fan_in, fan_out) != (layer.in_features, layer.out_features) or r != r_b:
            raise AdapterError(
                f"adapter {name}: {weights}: {module}: lora_A {list(shape)} / lora_B {list(b_shape)} do not fit the "
                f"base layer ({layer.in_features} → {layer.out_features}); the adapter was trained on another model"
            )
        layers[module] = (r, fan_in, fan_out)
    if not layers and not tables:
        raise AdapterError(f"adapter {name}: {weights} holds no LoRA weights (expected *{A_KEY} and *{B_KEY} tensors)")
    if "head" in tables and head_name in layers:
        raise AdapterError(
            f"adapter {name}: {weights}: {head_name} is both trained in full and adapted with LoRA (expected one)"
        )
    embed_key, head_key = tables.get("embed"), tables.get("head")
    if getattr(config, "ensure_weight_tying", False) and getattr(model.config, "tie_word_embeddings", False):
        # PEFT ties the head to the trained embedding on load (it saves the same table under both names).
        embed_key = head_key = embed_key or head_key
    if config.use_dora and magnitudes != set(layers):
        raise AdapterError(
            f"adapter {name}: {weights}: use_dora is set but magnitude vectors are missing for some layers"
        )
    scales = {m: _scale(config, m, r) for m, (r, _, _) in layers.items()}
    item = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    nbytes = sum(r * (i + o) + (o if config.use_dora else 0) for r, i, o in layers.values()) * item
    if embed_key or head_key:  # whole [vocab, hidden] tables; a tied head shares the embedding's
        table = unwrap(model.get_input_embeddings()).weight
        nbytes += len({k for k in (embed_key, head_key) if k is not None}) * table.numel() * item
    return AdapterInfo(name, root, layers, scales, bool(config.use_dora), nbytes, base, embed_key, head_key)


def load_weights(info: AdapterInfo) -> AdapterWeights:
    """Read an adapter's weights."""
    from safetensors.torch import load_file

    tensors = load_file(str(info.path / "adapter_model.safetensors"))
    layers = {
        m: LayerDelta(
            tensors[PREFIX + m + A_KEY],
            tensors[PREFIX + m + B_KEY],
            info.scales[m],
            tensors.get(PREFIX + m + MAG_KEY) if info.dora else None,
        )
        for m in info.layers
    }
    embed = tensors[info.embed_key] if info.embed_key else None
    head = embed if info.head_key == info.embed_key else tensors[info.head_key] if info.head_key else None
    return AdapterWeights(layers, embed, head)


def _check_table(name: str, weights: Path, kind: str, key: str, shape: tuple, model: nn.Module, module: str) -> None:
    """An adapter's own embedding table or LM head must be a plain one of the base's shape."""
    own = unwrap(model.get_submodule(module))
    if kind == "embed":
        plain = type(own) is nn.Embedding and own.max_norm is None
    else:
        plain = type(own) is nn.Linear and own.bias is None
    if not plain:
        raise AdapterError(
            f"adapter {name}: {weights}: {key}: the base's {module} is a {type(own).__name__}, which the batched "
            "engine cannot give per-row tables (merge the adapter and serve the merged model)"
        )
    if tuple(shape) != tuple(own.weight.shape):
        raise AdapterError(
            f"adapter {name}: {weights}: {key} is {list(shape)} but the base's {module} is "
            f"{list(own.weight.shape)} (expected an adapter trained on this base, with the same vocabulary)"
        )


def _split_key(name: str, weights: Path, key: str) -> tuple[str, str]:
    for kind in (A_KEY, B_KEY, MAG_KEY):
        if key.startswith(PREFIX) and key.endswith(kind):
            return key[len(PREFIX) : -len(kind)], kind
    raise AdapterError(
        f"adapter {name}: {weights}: tensor {key} is not a LoRA weight of a Linear layer (expected "
        f"{PREFIX}<layer>{A_KEY} / {B_KEY} / {MAG_KEY}); adapters with extra trained modules, biases or "
        "embedding LoRA cannot share a batch — merge them and serve the merged model"
    )


def _check_options(name: str, config_file: Path, config: Any, embed_name: str | None, head_name: str | None) -> None:
    served = [m for m in (embed_name, head_name) if m is not None]
    for module in config.modules_to_save or ():
        if not any(m == module or m.endswith("." + module) for m in served):
            raise AdapterError(
                f"adapter {name}: {config_file}: modules_to_save lists {module!r}, which the batched engine does not "
                f"serve per row (served: the input embedding and LM head, {' and '.join(served) or 'none here'}); "
                "merge the adapter and serve the merged model"
            )
    for opt in FORWARD_CHANGING:
        value = getattr(config, opt, None)
        if value:
            raise AdapterError(
                f"adapter {name}: {config_file}: {opt} = {value!r} is not supported by the batched engine (it "
                "changes the layer's output beyond base + scale·B·A); merge the adapter and serve the merged model"
            )
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        variant = f.metadata.get("is_lora_variant") and value and f.name not in SERVED_VARIANTS
        if variant or value in (f.metadata.get("lora_variants") or ()):
            raise AdapterError(
                f"adapter {name}: {config_file}: {f.name} = {value!r} is a LoRA variant the batched engine does "
                "not compute (served: plain LoRA, rsLoRA, DoRA); merge the adapter and serve the merged model"
            )


def _check_base(name: str, config_file: Path, recorded: str | None, base_path: Path, model: nn.Module) -> None:
    """The adapter names its base; it must be this one (same directory or name, or a copy with the same config)."""
    if not recorded or recorded == str(base_path):
        return
    where = Path(recorded).expanduser()
    if where.is_dir() and where.resolve() == base_path.resolve():
        return
    if (where / "config.json").is_file():
        theirs = json.loads((where / "config.json").read_text())
        ours = model.config.to_dict()
        for key in ARCHITECTURE_FIELDS:
            if key in theirs and key in ours and theirs[key] != ours[key]:
                raise AdapterError(
                    f"adapter {name}: {config_file}: base_model_name_or_path {recorded!r} is another model "
                    f"({key} {theirs[key]} there, {ours[key]} in this engine's base {base_path})"
                )
        return
    if where.name == base_path.name:  # the same model moved, or a hub id whose snapshot this is
        return
    raise AdapterError(
        f"adapter {name}: {config_file}: base_model_name_or_path is {recorded!r} but this engine serves "
        f"{str(base_path)!r} (expected an adapter trained on it; if it is the same model under another name, set "
        "base_model_name_or_path in adapter_config.json to this path)"
    )


def _scale(config: Any, module: str, r: int) -> float:
    """PEFT's scaling for one layer: alpha / r (alpha / √r with rsLoRA), honouring alpha_pattern."""
    from peft.utils.other import get_pattern_key

    alpha_patterns = config.alpha_pattern or {}
    alpha = alpha_patterns.get(get_pattern_key(alpha_patterns.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


@dataclass
class Entry:
    """A registered adapter; ``slot`` is set while its weights are resident."""

    info: AdapterInfo
    pinned: bool = False
    slot: int | None = None
    users: int = 0  # running requests that read it
    removed: bool = False
    staged: AdapterWeights | None = field(default=None, repr=False)


class AdapterPool:
    """Registered adapters; the resident ones in least-recently-used order, within ``budget`` bytes.

    Registration and staging (reading weights from disk) may run on any thread; ``acquire``/``release``, which
    install into and evict from the model's layers, run where no forward pass is in flight (the engine's loop).
    """

    def __init__(self, bank: LoraBank, model: nn.Module, base_path: Path, budget: int | None) -> None:
        self.bank, self.model, self.base_path, self.budget = bank, model, base_path, budget
        self.tables = VocabTables(model, bank.rows)
        self.entries: dict[str, Entry] = {}
        self.resident: OrderedDict[int, Entry] = OrderedDict()  # by slot, least recently used first
        self.lock = threading.RLock()

    def register(self, name: str, path: str | Path, *, pin: bool = False) -> Entry:
        info = inspect_adapter(name, path, self.model, self.base_path)
        if self.budget is not None and info.nbytes > self.budget:
            raise AdapterError(
                f"adapter {name}: needs {info.nbytes} bytes but the adapter budget is {self.budget} bytes "
                "(raise adapter_budget_bytes)"
            )
        with self.lock:
            old = self.entries.get(name)
            same = old is not None and old.info.path.resolve() == info.path.resolve()
            if pin and self.budget is not None and not (same and old.pinned):
                pinned = sum(e.info.nbytes for e in self.entries.values() if e.pinned and e is not old)
                if pinned + info.nbytes > self.budget:
                    raise AdapterError(
                        f"adapter {name}: pinning it would hold {pinned + info.nbytes} bytes of pinned adapters, over "
                        f"the adapter budget of {self.budget} bytes (unpin another or raise adapter_budget_bytes)"
                    )
            if same:
                old.pinned = old.pinned or pin
                return old
            if old is not None:
                self._detach(old)
            entry = Entry(info, pinned=pin)
            self.entries[name] = entry
            return entry

    def unregister(self, name: str) -> None:
        with self.lock:
            entry = self.get(name)
            del self.entries[name]
            self._detach(entry)

    def get(self, name: str) -> Entry:
        with self.lock:
            entry = self.entries.get(name)
        if entry is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded{suggest(name, sorted(self.entries))}")
        return entry

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.entries)

    def stage(self, entry: Entry) -> None:
        """Read the weights of a non-resident adapter ahead of its use, off the decoding thread."""
        with self.lock:
            if entry.slot is not None or entry.staged is not None:
                return
        weights = load_weights(entry.info)
        with self.lock:
            if entry.slot is None:
                entry.staged = weights

    def acquire(self, entry: Entry) -> int | None:
        """The slot of ``entry`` for one more running request, installing it (and evicting) as needed.

        None when it cannot fit now: every resident adapter is pinned or in use; try again when one is released.
        """
        with self.lock:
            if entry.slot is None:
                pinned = sum(e.info.nbytes for e in self.entries.values() if e.pinned and e is not entry)
                if self.budget is not None and pinned + entry.info.nbytes > self.budget:
                    raise AdapterError(
                        f"adapter {entry.info.name}: needs {entry.info.nbytes} bytes, but pinned adapters hold "
                        f"{pinned} of the adapter budget of {self.budget} bytes (unpin one or raise the budget)"
                    )
                if not self._make_room(entry.info.nbytes):
                    return None
                weights = entry.staged if entry.staged is not None else load_weights(entry.info)
                entry.slot, entry.staged = self.bank.install(weights.layers), None
                self.tables.put(entry.slot, weights.embed, weights.head)
            self.resident[entry.slot] = entry
            self.resident.move_to_end(entry.slot)
            entry.users += 1
            return entry.slot

    def release(self, entry: Entry) -> None:
        with self.lock:
            entry.users -= 1
            if entry.removed and entry.users == 0:
                self._evict(entry)

    def load_pinned(self) -> None:
        """Install pinned adapters that are not resident yet (eager loading)."""
        with self.lock:
            for entry in list(self.entries.values()):
                if entry.pinned and entry.slot is None and self.acquire(entry) is not None:
                    entry.users -= 1

    def resident_bytes(self) -> int:
        with self.lock:
            return sum(e.info.nbytes for e in self.resident.values())

    def _make_room(self, nbytes: int) -> bool:
        if self.budget is None:
            return True
        used = self.resident_bytes()
        for entry in list(self.resident.values()):  # least recently used first
            if used + nbytes <= self.budget:
                break
            if entry.users == 0 and not entry.pinned:
                used -= entry.info.nbytes
                self._evict(entry)
        return used + nbytes <= self.budget

    def _evict(self, entry: Entry) -> None:
        if entry.slot is not None:
            self.resident.pop(entry.slot, None)
            self.tables.clear(entry.slot)
            self.bank.release(entry.slot)
            entry.slot = None

    def _detach(self, entry: Entry) -> None:
        """A replaced or removed adapter: gone now if idle, else when its last running request ends."""
        entry.removed, entry.pinned, entry.staged = True, False, None
        if entry.users == 0:
            self._evict(entry)
