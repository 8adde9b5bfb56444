"""Typed service configuration: `serve/config.yaml` < env `LLMREC_SERVE_*` < CLI `--set key=value`.

Env keys: `LLMREC_SERVE_PORT=8001`, nested with a double underscore: `LLMREC_SERVE_LLM__BACKEND=transformers`,
`LLMREC_SERVE_LLM__ADAPTERS="{yesno: artifacts/adapters/yesno}"` (values are parsed as YAML scalars, except the
secrets `LLMREC_SERVE_API_KEY` and `LLMREC_SERVE_USER_HASH_KEY`, taken verbatim as the client sends them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmrec.config import ConfigError, apply_overrides, from_dict, load_yaml

ENV_PREFIX = "LLMREC_SERVE_"
# secrets set through the environment are taken verbatim: parsed as YAML, `null`/`~` would turn the API key off,
# `0123` become `83`, `on` become `True`, `k #x` lose ` #x` (and `llmrec recommend` sends $LLMREC_SERVE_API_KEY as is)
VERBATIM_ENV_KEYS = ("api_key", "user_hash_key")


@dataclass
class LLMConfig:
    """Which model serves the prompts and where it runs."""

    # auto: vLLM when it is importable (or `vllm_url` is set), else the in-process transformers backend;
    # none: no LLM at all, every answer comes from the collaborative fallback (degraded: true)
    backend: Literal["auto", "vllm", "transformers", "none"] = "auto"
    model: str | None = None  # HF model folder; None = the embedded SmolLM2-135M-Instruct (converted once)
    vllm_url: str | None = None  # an existing OpenAI-compatible endpoint (http://127.0.0.1:8011/v1); else launch one
    vllm_host: str = "127.0.0.1"
    vllm_port: int = 8011
    vllm_python: str | None = None  # interpreter that has vllm (e.g. .venv-vllm/bin/python); default: this one
    vllm_startup_timeout_s: float = 600.0
    vllm_extra_args: list[str] = field(default_factory=list)  # passed verbatim to the vLLM api_server
    # adapter registry: name -> adapter folder. Requests may only name these (never a path).
    adapters: dict[str, str] = field(default_factory=dict)
    default_adapter: str | None = None
    # how vLLM serves adapters: merged = one adapter merged into the base (`llmrec export --merge`), served as the
    # model (fast on CPU); lora = base + --lora-modules (several adapters; ~10x slower on CPU); auto = merged when
    # on CPU with exactly one adapter, else lora. QLoRA adapters (llmrec_base.json) are fitted to their dequantized
    # 4-bit base: vLLM serves one merged only (auto merges it on a GPU too; lora refuses them), the transformers
    # backend loads that base for them
    adapter_mode: Literal["auto", "merged", "lora"] = "auto"
    # = llmrec.llm.loading's dtypes (a test checks they agree): checked with the config, not after the event store
    # has been filled and the model is being loaded
    dtype: Literal["fast", "bfloat16", "float32", "float16", "auto"] = "fast"
    # transformers backend: nf4 4-bit base (bitsandbytes), the base a QLoRA adapter was trained on; a quarter of the
    # weights' memory. Picks the transformers backend under `auto`; vLLM has its own options (vllm_extra_args)
    load_in_4bit: bool = False
    max_model_len: int = 2048
    timeout_s: float = 60.0  # per recommendation / score call; past it -> fallback or 503


@dataclass
class ServiceConfig:
    dataset: str = "ml-100k"  # prepared dataset: catalogue, initial store content, fallback model
    store_url: str | None = None  # SQL URL; default sqlite:///$LLMREC_HOME/store/<dataset>.db
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10
    max_k: int = 100
    max_history: int = 2000  # most recent events passed to the recommender (seen-item exclusion + prompt)
    max_history_page: int = 1000  # limit of GET /history
    max_score_items: int = 100  # item_ids per POST /v1/score
    max_body_bytes: int = 16_384
    api_key: str | None = None  # optional bearer key (also LLMREC_SERVE_API_KEY); /health stays open
    user_hash_key: str | None = None  # HMAC key for user ids in logs; random per process when unset
    cache_size: int = 10_000  # answers cached per (user, history version, k, explain, adapter)
    fallback: Literal["collaborative", "none"] = "collaborative"  # none: 503 when the LLM fails
    # micro: the service groups concurrent requests' backend calls itself; none: each request calls the backend
    # (vLLM batches concurrent calls itself); auto: micro on the in-process transformers backend, none on vLLM
    batching: Literal["auto", "none", "micro"] = "auto"
    batch_max_size: int = 16
    batch_max_wait_ms: float = 10.0
    candidates: int = 20  # candidates the recommender ranks (passed as `n_candidates` when it accepts it)
    # rating events above it count as likes; null = the dataset's own rule (its manifest's like_threshold, as its
    # prepared labels and the adapters' training prompts read ratings), else 3
    like_threshold: float | None = None
    # [low, high]: the values a rating event may have (422 outside); null = the dataset's own scale when its labels
    # come from ratings (label_rule rating_threshold: the lowest and highest rating it holds, 1..5 for MovieLens),
    # else any finite number (e.g. a play count)
    rating_range: list[float] | None = None
    # never recommend an item listed under the title of one the user has seen (catalogue duplicates, e.g. ML-100K's
    # 18 films with two ids each); false: seen items are excluded by id only
    exclude_seen_titles: bool = True
    # verbalizer: candidate letters' log-probs, one forward pass; likelihood: each candidate title's mean log-prob
    # after the history (an adapter tuned with the next_title recipe; RankingConfig.mode)
    rank_mode: Literal["verbalizer", "likelihood"] = "verbalizer"
    retrieval_weight: float = 4.0  # LLM score + w x log(1/retrieval rank); 0 = the LLM's order alone
    # verbalizer: candidates listed this many times in cyclically shifted orders, letter log-probs averaged (cancels
    # the LLM's letter / position preference; that many forward passes per user)
    listings: int = 1
    # candidate retriever: text | hybrid (text + item-CF) | hybrid:sasrec (text + SASRec, loaded from its checkpoint
    # or fitted once at start; hybrid:bert_lstm likewise) | itemcf (item-CF alone, no sentence-transformer) | sasrec /
    # bert_lstm (that baseline alone) | ensemble (BERT+LSTM and SASRec fused by RRF); every choice scores any
    # history from the event store, known users or not
    retriever: Literal["text", "hybrid", "hybrid:itemcf", "hybrid:sasrec", "hybrid:bert_lstm", "itemcf", "sasrec",
                       "bert_lstm", "ensemble"] = "hybrid"
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        for name in ("listings", "max_k", "max_history", "max_history_page", "max_score_items", "max_body_bytes",
                     "cache_size", "batch_max_size", "candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        # finite and bounded: an infinite (YAML .inf) or huge wait overflowed the micro-batcher's queue timeout, which
        # killed its worker thread and left every request waiting until llm.timeout_s
        if not 0 <= self.batch_max_wait_ms <= 60_000:
            raise ConfigError(f"batch_max_wait_ms: must be >= 0 and at most 60000 (got {self.batch_max_wait_ms})")
        # finite: an infinite (YAML .inf) timeout made every vLLM call fail ("not reachable: timestamp out of range")
        # and an infinite start-up wait never gave up on a server that does not answer
        for name, value in (("llm.timeout_s", self.llm.timeout_s),
                            ("llm.vllm_startup_timeout_s", self.llm.vllm_startup_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a finite number > 0 (got {value})")
        for name, value in (("port", self.port), ("llm.vllm_port", self.llm.vllm_port)):
            if not 1 <= value <= 65535:
                raise ConfigError(f"{name}: must be within 1..65535 (got {value})")
        if self.llm.max_model_len < 1:
            raise ConfigError(f"llm.max_model_len: must be >= 1 (got {self.llm.max_model_len})")
        if self.like_threshold is not None and not math.isfinite(self.like_threshold):
            raise ConfigError(f"like_threshold: must be a finite number (got {self.like_threshold})")
        if self.rating_range is not None:
            r = self.rating_range
            if (len(r) != 2 or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                                       for x in r) or not r[0] < r[1]):
                raise ConfigError(f"rating_range: must be [low, high], two finite numbers with low < high (got {r!r})")
        if not (math.isfinite(self.retrieval_weight) and self.retrieval_weight >= 0):
            raise ConfigError(f"retrieval_weight: must be a finite number >= 0 (got {self.retrieval_weight})")
        if not 1 <= self.default_k <= self.max_k:
            raise ConfigError(f"default_k: must be within 1..max_k ({self.max_k})")
        if self.api_key is not None:
            # checked here: an empty key silently turned the check off (`if api_key`), and a key no client can send
            # (HTTP strips a header value's surrounding spaces; clients send headers as ASCII) answered every call 401
            if not self.api_key:
                raise ConfigError("api_key: empty; leave it unset (null) for no key check, or give a key")
            bad = next((c for c in self.api_key if not " " <= c <= "~"), None)
            if bad is not None or self.api_key != self.api_key.strip():
                what = f"holds {bad!r}" if bad is not None else "starts or ends with a space"
                raise ConfigError(f"api_key: {what}; a bearer key must be printable ASCII without surrounding spaces "
                                  "(clients could never send it)")
        if self.llm.backend == "none" and self.fallback == "none":
            # nothing could answer: every recommendation would be a 503 while /health and /ready said ok
            raise ConfigError("fallback: none with llm.backend: none leaves nothing to answer recommendations; keep "
                              "fallback: collaborative (answers labelled degraded: true) or configure an LLM backend")
        if self.llm.default_adapter is not None and self.llm.default_adapter not in self.llm.adapters:
            raise ConfigError(f"llm.default_adapter: {self.llm.default_adapter!r} is not in llm.adapters")
        for name in self.llm.adapters:
            if not name or any(c in name for c in "/\\ ") or name.startswith("."):
                raise ConfigError(f"llm.adapters: invalid adapter name {name!r} (no slashes, spaces or leading dot)")


def env_pairs(environ: dict[str, str] | None = None) -> list[str]:
    """`LLMREC_SERVE_LLM__MODEL=x` -> `llm.model=x` for every variable with the prefix."""
    env = os.environ if environ is None else environ
    return [f"{k[len(ENV_PREFIX):].lower().replace('__', '.')}={v}"
            for k, v in env.items() if k.startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX)]


def load_service_config(
    path: str | Path | None = None, overrides: list[str] | None = None, environ: dict[str, str] | None = None
) -> ServiceConfig:
    data = load_yaml(path) if path else {}
    pairs = env_pairs(environ)
    verbatim = {k: v for k, _, v in (p.partition("=") for p in pairs) if k in VERBATIM_ENV_KEYS}
    pairs = [p for p in pairs if p.partition("=")[0] not in VERBATIM_ENV_KEYS]
    label = f"environment ({ENV_PREFIX}*)"
    env = apply_overrides(ServiceConfig, data, pairs, label)
    data = apply_overrides(ServiceConfig, {**env, **verbatim}, overrides)
    # a value refused when the config is built names where it came from: the file, the environment or --set
    data.override_labels = {**env.override_labels, **dict.fromkeys(verbatim, label), **data.override_labels}
    return from_dict(ServiceConfig, data, where=str(path) if path else "service config")
