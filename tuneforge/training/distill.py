"""Knowledge distillation (``method: distill``): a teacher model's knowledge into the student (``model``).

Two modes, picked by ``distill.mode`` (``auto``: logits when the two tokenizers have the same vocabulary):

- **logits** — word-level KD. The data is ordinary SFT data (chat, prompt/completion or text). Each micro-batch
  goes through the student and the frozen teacher; at every supervised position the student's next-token
  distribution is pulled towards the teacher's with forward KL, reverse KL or the generalised JSD
  (``tuneforge.objectives.distill``), mixed with ``alpha`` × the plain cross-entropy on the data's own answers.
  Only supervised positions are projected to the vocabulary, for both models. Like SFT, a step's loss is a sum
  over its supervised tokens divided by their count, so it is the same however the step is split into
  micro-batches or replicas.
- **sequence** — sequence-level KD (Kim & Rush 2016), for a teacher with another tokenizer. The teacher answers
  every example's prompt (with its own tokenizer and chat template) once, before training; its answers are
  written as chat JSONL under the token cache, keyed by the teacher, the data and the generation settings, and
  reused by later runs (and by elastic replicas). The student then learns them with plain SFT. Decoding is
  greedy: the teacher's single most likely answer is what Kim & Rush approximate with beam search, and it makes
  the cache deterministic. ``generation.max_new_tokens`` and ``generation.stop`` apply; the sampling settings
  (``temperature``, ``top_p``, ``top_k``) are for online methods and are not used here. With ``alpha > 0`` the
  data's own answers are mixed in as extra sources holding ``alpha`` of the supervised tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import DistillConfig, GenerationConfig, Recipe
from tuneforge.data.pipeline import SourceExamples, load_sources, record_key
from tuneforge.data.sanitize import content_hash
from tuneforge.data.token_cache import tokenizer_fingerprint
from tuneforge.errors import ModelError, RecipeError, TuneforgeError
from tuneforge.eval.generate import generate_answers
from tuneforge.files import atomic_write
from tuneforge.methods import method_spec
from tuneforge.models.loading import check_model_path, load_tokenizer, model_fingerprint
from tuneforge.models.reference import Reference
from tuneforge.models.teacher import (
    check_teacher_path,
    head_width,
    load_teacher,
    load_teacher_tokenizer,
    same_vocabulary,
)
from tuneforge.objectives.distill import distill_loss
from tuneforge.objectives.sft import sft_loss
from tuneforge.paths import cache_dir
from tuneforge.training import sft_task
from tuneforge.training.build import check_formats
from tuneforge.training.forward import supervised_logits, supports_selective_head
from tuneforge.training.precision import autocast, pick_device, pick_precision
from tuneforge.training.sft_task import BatchShape, SFTPrepared, SFTTask
from tuneforge.training.task import MetricSums, StepOutput, held_out_means

log = logging.getLogger(__name__)

ANSWER_CACHE_VERSION = 1
GENERATION_BATCH = 32  # prompts decoded together by the teacher
MAX_EVAL_EXAMPLES = 512  # validation examples scored per source


# --------------------------------------------------------------------------------------------- set-up


@dataclass
class DistillPrepared(SFTPrepared):
    """``build.Prepared`` plus the resolved mode; in logits mode ``make_task`` also loads the teacher."""

    mode: str = "logits"
    teacher: str = ""

    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device) -> SFTTask:
        sft = super().make_task(model, micro_batch_size, precision, device)
        if self.mode == "sequence":  # the teacher's answers are the data: plain SFT from here on
            return sft
        recipe = self.recipe
        assert recipe.distill is not None
        teacher = load_teacher(recipe, device)
        vocab = len(self.tokenizer)
        for field_name, name, m in (
            ("distill.teacher", recipe.distill.teacher, teacher),
            ("model.path", recipe.model.path, model),
        ):
            if head_width(m) < vocab:
                raise ModelError(
                    f"{field_name}: {name} predicts {head_width(m)} tokens, fewer than the {vocab} of "
                    "the shared tokenizer, so its distribution cannot be compared in logits mode"
                )
        return DistillTask(
            sft.plan,
            sft.sources,
            sft.val_sources,
            sft.shape,
            teacher=Reference(teacher),
            cfg=recipe.distill,
            vocab_size=vocab,
        )


def prepare(recipe: Recipe) -> DistillPrepared:
    """Check the teacher and every record, pick the mode, and (sequence mode) have the teacher write the answers.

    Everything that can fail cheaply fails first: the teacher's path, then the data, then the two tokenizers.
    """
    cfg = recipe.distill
    if cfg is None:
        raise RecipeError("distill: method distill needs a 'distill:' section (e.g. distill: {teacher: path})")
    check_teacher_path(cfg.teacher)
    loaded = load_sources(recipe)
    check_formats(method_spec(recipe.method), loaded)
    check_model_path(recipe.model.path)
    student_tok = load_tokenizer(
        recipe.model.tokenizer or recipe.model.path, recipe.model.chat_template, recipe.model.trust_remote_code
    )
    teacher_tok = load_teacher_tokenizer(cfg.teacher, recipe.model.trust_remote_code)
    same = same_vocabulary(student_tok, teacher_tok)
    mode = cfg.mode if cfg.mode != "auto" else ("logits" if same else "sequence")
    if mode == "logits":
        if not same:
            raise RecipeError(
                f"distill.mode: logits needs the teacher and the student to share one vocabulary, but the tokenizers "
                f"of {cfg.teacher} ({len(teacher_tok)} tokens) and {recipe.model.tokenizer or recipe.model.path} "
                f"({len(student_tok)} tokens) map tokens differently; use mode: sequence (or auto)"
            )
        for i, src in enumerate(loaded):
            if src.format == "prompt":
                raise RecipeError(
                    f"data.sources[{i}].format: {src.path} holds prompts without answers, so there "
                    "are no positions to compare the teacher and student on; use distill.mode: sequence "
                    "(the teacher writes the answers)"
                )
        prepared = sft_task.prepare(recipe, loaded=loaded)
    else:
        why = "" if cfg.mode == "sequence" else " (chosen by distill.mode: auto because the vocabularies differ)"
        for i, src in enumerate(loaded):
            if src.format == "text":
                raise RecipeError(
                    f"data.sources[{i}].format: {src.path} holds plain text, which has no prompts for "
                    f"the teacher to answer; sequence-level distillation{why} needs chat, "
                    "prompt/completion or prompt records"
                )
            if src.format == "prompt" and cfg.alpha > 0:
                raise RecipeError(
                    f"distill.alpha: {src.path} holds prompts without answers, so there is no "
                    f"plain cross-entropy on the data's answers to weigh; set alpha: 0"
                )
        prepared = sft_task.prepare(recipe, loaded=sequence_sources(recipe, loaded, teacher_tok))
    values = {f.name: getattr(prepared, f.name) for f in fields(SFTPrepared)}
    return DistillPrepared(**values, mode=mode, teacher=cfg.teacher)


# --------------------------------------------------------------------------------------------- logits mode


class DistillTask(SFTTask):
    """SFT's samples and weights; the loss at each supervised token is ``(1 - alpha) · KD + alpha · CE``.

    KD is summed over tokens (like SFT's cross-entropy), and the loop divides by the step's supervised-token count,
    so gradients do not depend on the micro-batch split.
    """

    def __init__(
        self,
        plan: Any,
        sources: list[Any],
        val_sources: dict[str, Any],
        shape: BatchShape,
        *,
        teacher: Reference,
        cfg: DistillConfig,
        vocab_size: int,
    ) -> None:
        super().__init__(plan, sources, val_sources, shape)
        self.teacher = teacher
        assert teacher.frozen is not None, "a teacher is a model of its own"
        self.teacher_selective = supports_selective_head(teacher.frozen)
        self.cfg = cfg
        self.vocab_size = vocab_size  # both heads may be padded past the tokenizer; extra ids are never real tokens

    def _logits(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student logits (with grad), teacher logits and targets at the batch's supervised positions."""
        s = self.shape
        with autocast(s.precision, s.device):
            student, targets = supervised_logits(model, batch, s.selective_head)
            with self.teacher.use(model) as frozen:
                teacher, _ = supervised_logits(frozen, batch, self.teacher_selective)
        v = self.vocab_size
        return student[:, :v], teacher[:, :v], targets

    def token_sums(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor,
        kind: str | None = None,
        temperature: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Summed divergence, cross-entropy, objective and top-1 agreement over the given positions."""
        c = self.cfg
        n = targets.numel()
        mask = torch.ones((1, n), dtype=torch.bool, device=targets.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.alpha < 1.0):
            kd, metrics = distill_loss(
                student[None],
                teacher[None],
                mask,
                kind=kind or c.kind,
                beta=c.beta,
                temperature=temperature or c.temperature,
                num_items_in_batch=1,
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.alpha > 0.0):  # a term of weight 0 needs no grad
            ce, _ = sft_loss(student, targets)
        loss = kd if c.alpha == 0.0 else ce if c.alpha == 1.0 else (1.0 - c.alpha) * kd + c.alpha * ce
        return {"kd": kd, "ce": ce, "loss": loss, "agree": metrics["distill/top1_agreement"] * n}

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput:
        """Accumulate gradients of ``scale · Σ token losses`` over the rows `indices`, in micro-batches."""
        loss_acc = torch.zeros((), device=self.shape.device)
        sums = MetricSums()
        fed = 0
        for batch in self.batches(indices):
            student, teacher, targets = self._logits(model, batch)
            part = self.token_sums(student, teacher, targets)
            (part["loss"] * scale).backward()
            loss_acc += part["loss"].detach()
            n = targets.numel()
            sums.add("distill_divergence", part["kd"].detach(), n)
            sums.add("distill_top1_agreement", part["agree"].detach(), n)
            fed += batch.num_tokens
        return StepOutput(loss_acc, fed, sums.metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_examples: int = MAX_EVAL_EXAMPLES) -> dict[str, float]:
        """Per validation source and overall (token-weighted): the objective (``loss``), KL(teacher ‖ student) at
        temperature 1 (``kl``), the configured divergence, cross-entropy on the data and top-1 agreement."""
        model.eval()
        parts = {}
        for name, src in self.val_sources.items():
            part = dict.fromkeys(("loss", "kl", "divergence", "ce", "agreement"), 0.0)
            tokens = 0
            for batch in self.val_batches(src, max_examples):
                student, teacher, targets = self._logits(model, batch)
                sums = self.token_sums(student, teacher, targets)
                kl = self.token_sums(student, teacher, targets, kind="forward_kl", temperature=1.0)["kd"]
                for key, value in (
                    ("loss", sums["loss"]),
                    ("kl", kl),
                    ("divergence", sums["kd"]),
                    ("ce", sums["ce"]),
                    ("agreement", sums["agree"]),
                ):
                    part[key] += float(value)
                tokens += targets.numel()
            parts[name] = (part, float(tokens))
        model.train()
        return held_out_means(parts)


# --------------------------------------------------------------------------------------------- sequence mode


def teacher_prompt(messages: Sequence[dict]) -> list[dict]:
    """The conversation without its final assistant turn (all of it when it ends on a user or tool turn).

    Earlier assistant turns stay as context with weight 0: the student learns only what the teacher wrote.
    """
    end = len(messages) - 1 if messages and messages[-1].get("role") == "assistant" else len(messages)
    prompt = []
    for m in messages[:end]:
        m = {k: v for k, v in m.items() if k != "weight"}
        prompt.append({**m, "weight": 0} if m.get("role") == "assistant" else m)
    return prompt


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (the tokenizer's EOS already ended generation)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def answers_key(teacher: str, teacher_tok: Any, src: SourceExamples, gen: GenerationConfig) -> str:
    """What decides the teacher's answers: its weights, tokenizer and template, the prompts and the decoding."""
    blob = {
        "v": ANSWER_CACHE_VERSION,
        "teacher": model_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(teacher_tok),
        "template": teacher_tok.chat_template,
        "train": content_hash(src.train),
        "val": content_hash(src.val),
        "decoding": "greedy",
        "max_new_tokens": gen.max_new_tokens,
        "stop": list(gen.stop),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def _read_cached(path: Path, meta_path: Path) -> tuple[list[dict], list[dict]] | None:
    """The cached (train, val) records, or None when absent or incomplete."""
    if not meta_path.exists() or not path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(records) != meta["train"] + meta["val"]:
        return None
    return records[: meta["train"]], records[meta["train"] :]


class _LazyTeacher:
    """The teacher is loaded only when some source's answers are not cached yet."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.model: torch.nn.Module | None = None

    def get(self) -> torch.nn.Module:
        if self.model is None:
            if self.recipe.train.num_threads:
                torch.set_num_threads(self.recipe.train.num_threads)
            self.model = load_teacher(self.recipe, pick_device(self.recipe.train.device))
        return self.model


def _answer(teacher: _LazyTeacher, teacher_tok: Any, examples: list[dict], gen: GenerationConfig) -> list[dict]:
    """Chat records whose last assistant turn the teacher wrote; examples it answered with nothing are dropped."""
    if not examples:
        return []
    model = teacher.get()
    device = next(model.parameters()).device
    prompts = [teacher_prompt(ex["messages"]) for ex in examples]
    with autocast(pick_precision(teacher.recipe.train.precision, device), device):
        answers = generate_answers(
            model, teacher_tok, prompts, max_new_tokens=gen.max_new_tokens, batch_size=GENERATION_BATCH
        )
    out = []
    for ex, prompt, answer in zip(examples, prompts, answers):
        answer = cut_at_stop(answer, gen.stop)
        if answer:
            out.append(
                {
                    "messages": [*prompt, {"role": "assistant", "content": answer}],
                    **({"tools": ex["tools"]} if "tools" in ex else {}),
                }
            )
    return out


def teacher_source(recipe: Recipe, src: SourceExamples, teacher: _LazyTeacher, teacher_tok: Any) -> SourceExamples:
    """`src` with the teacher's answers, read from the cache or generated and written there (chat JSONL)."""
    assert recipe.distill is not None
    gen = recipe.generation
    key = answers_key(recipe.distill.teacher, teacher_tok, src, gen)
    root = cache_dir("tokens") / "distill"
    root.mkdir(parents=True, exist_ok=True)
    path, meta_path = root / f"{key}.jsonl", root / f"{key}.json"
    cached = _read_cached(path, meta_path) if recipe.data.cache else None
    if cached is not None:
        train, val = cached
    else:
        log.info("distill: the teacher answers %d prompts of %s", len(src.train) + len(src.val), src.name)
        train, val = _answer(teacher, teacher_tok, src.train, gen), _answer(teacher, teacher_tok, src.val, gen)
        if not train:
            raise TuneforgeError(
                f"distill.teacher: {recipe.distill.teacher} answered none of the {len(src.train)} "
                f"prompts of {src.path} with any text (raise generation.max_new_tokens, or check the "
                "teacher's chat template and end-of-sequence token)"
            )
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train + val))
        atomic_write(
            meta_path,
            json.dumps({"source": src.path, "teacher": recipe.distill.teacher, "train": len(train), "val": len(val)}),
        )  # written last: marks done
    lines: dict[str, int] = {}
    for line, record in enumerate(train + val, start=1):
        lines.setdefault(record_key(record), line)
    stats = dict(
        src.stats,
        train=len(train),
        val=len(val),
        teacher=recipe.distill.teacher,
        teacher_answers=len(train) + len(val),
        teacher_empty=len(src.train) + len(src.val) - len(train) - len(val),
        teacher_cache_hit=cached is not None,
        teacher_data=str(path),
        source_hash=src.data_hash,
    )
    return SourceExamples(
        name=src.name,
        path=str(path),
        weight=src.weight,
        format="messages",
        train=train,
        val=val,
        lines=lines,
        data_hash=content_hash(train + val),
        stats=stats,
    )


def sequence_sources(recipe: Recipe, loaded: list[SourceExamples], teacher_tok: Any) -> list[SourceExamples]:
    """Each source with the teacher's answers (weight ``1 - alpha``), then the data's own (weight ``alpha``)."""
    assert recipe.distill is not None
    if teacher_tok.chat_template is None:
        raise ModelError(
            f"distill.teacher: the tokenizer of {recipe.distill.teacher} has no chat template, so "
            "prompts cannot be rendered for it to answer"
        )
    alpha = recipe.distill.alpha
    teacher = _LazyTeacher(recipe)
    out: list[SourceExamples] = []
    if alpha < 1.0:
        for src in loaded:
            out.append(replace(teacher_source(recipe, src, teacher, teacher_tok), weight=src.weight * (1.0 - alpha)))
    teacher.model = None  # free it before the student loads
    if alpha > 0.0:
        taken = {s.name for s in loaded}
        for src in loaded:
            name = f"{src.name}_data"
            while name in taken:
                name += "_"
            taken.add(name)
            out.append(replace(src, name=name, weight=src.weight * alpha))
    return out
