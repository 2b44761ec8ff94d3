"""``tuneforge serve --engine vllm``: the same routes on vLLM's ``AsyncLLM`` with multi-LoRA, on a GPU.

The class has the shape of :class:`tuneforge.serve.engine.Engine` — ``generate`` yields the same
:class:`TokenEvent` values, one per token — so the catalog and the routes do not know which engine runs. vLLM
batches adapters itself (``enable_lora``, up to ``max_loras`` in one batch, ``max_cpu_loras`` kept on the host),
so adapters are only named here and travel with each request as a ``LoRARequest``.

Written against vLLM's V1 API (``vllm.v1.engine.async_llm.AsyncLLM``, ``AsyncEngineArgs``, ``TokensPrompt``,
``RequestOutputKind.DELTA``); tuneforge's test machines have neither vLLM nor a GPU, so this path is not
exercised by the test suite.
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError


def check_available() -> None:
    """Refuse clearly, before any model is loaded, when vLLM or a CUDA GPU is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise TuneforgeError(
            "--engine vllm: vLLM is not installed (pip install vllm, on a machine with a CUDA GPU); "
            "the default engine (--engine tuneforge) runs anywhere"
        )
    import torch

    if not torch.cuda.is_available():
        raise TuneforgeError("--engine vllm: no CUDA GPU found; use the default engine (--engine tuneforge)")


class VllmEngine:
    """One base model on vLLM; LoRA adapters by name; the :class:`~tuneforge.serve.engine.Engine` interface."""

    def __init__(
        self,
        base_path: str | Path,
        *,
        max_batch_size: int = 32,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        check_available()
        from vllm.engine.arg_utils import AsyncEngineArgs

        from tuneforge.models.loading import load_tokenizer

        self.base_path = str(base_path)
        self.tokenizer = load_tokenizer(self.base_path)
        self.args = AsyncEngineArgs(
            model=self.base_path,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_num_seqs=max_batch_size,
            max_model_len=max_model_len,
            generation_config="vllm",  # sampling defaults are the request's, not the checkpoint's
        )
        self.llm: Any = None
        self.max_model_len = max_model_len
        self.loras: dict[str, Any] = {}
        self.ids = itertools.count(1)  # vLLM identifies adapters by a positive integer
        self.lock = threading.Lock()

    def start(self) -> None:
        if self.llm is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(self.args)
        self.max_model_len = self.llm.model_config.max_model_len

    def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def add_adapter(self, name: str, path: str | Path, *, pin: bool = False) -> None:
        """Name an adapter; vLLM loads it with the first request that uses it (``pin`` is vLLM's to decide)."""
        from vllm.lora.request import LoRARequest

        if not (Path(path) / "adapter_config.json").is_file():
            raise TuneforgeError(f"{path}: not a PEFT adapter directory (expected adapter_config.json)")
        with self.lock:
            self.loras[name] = LoRARequest(lora_name=name, lora_int_id=next(self.ids), lora_path=str(path))

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.loras:
                raise TuneforgeError(f"adapter {name!r}: not loaded (loaded: {', '.join(self.loras) or 'none'})")
            del self.loras[name]  # vLLM's LRU evicts its weights; no new request can name it

    def adapters(self) -> list[str]:
        with self.lock:
            return list(self.loras)

    async def generate(self, prompt_ids: list[int], params: Any, adapter: str | None = None) -> AsyncIterator[Any]:
        """One :class:`TokenEvent` per generated token; closing the generator aborts the vLLM request."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from tuneforge.serve.engine import TokenEvent

        lora = None
        if adapter is not None:
            with self.lock:
                lora = self.loras.get(adapter)
            if lora is None:
                raise TuneforgeError(f"adapter {adapter!r}: not loaded")
        sampling = SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            max_tokens=params.max_tokens,
            stop_token_ids=list(params.stop_token_ids),
            logprobs=params.logprobs,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,  # the HTTP layer detokenizes (stop strings, incremental text)
        )
        done = 0
        stream = self.llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling, uuid.uuid4().hex, lora_request=lora
        )
        async for out in stream:  # vLLM aborts the request when this generator is closed or cancelled
            result = out.outputs[0]
            new = list(result.token_ids)
            for k, token in enumerate(new):
                done += 1
                last = k == len(new) - 1 and out.finished
                logprob, top = None, None
                if params.logprobs is not None and result.logprobs:
                    ranked = result.logprobs[k]
                    logprob = ranked[token].logprob
                    best = sorted(ranked.items(), key=lambda kv: kv[1].rank or 0)[: params.logprobs]
                    top = [(t, lp.logprob) for t, lp in best]  # the k most likely (the chosen one too, if among them)
                yield TokenEvent(
                    token_id=token,
                    logprob=logprob,
                    top_logprobs=top,
                    finish_reason=(result.finish_reason or "stop") if last else None,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=done,
                )
            if out.finished and not new:
                yield TokenEvent(None, None, None, result.finish_reason or "stop", len(prompt_ids), done)

    def embed(self, batch: list[list[int]], adapter: str | None = None) -> list[list[float]]:
        raise TuneforgeError(
            "embeddings: the vLLM engine serves generation only (vLLM pools embeddings with a separate pooling "
            "runner); serve embeddings with the default engine (--engine tuneforge)"
        )
