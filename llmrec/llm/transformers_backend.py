"""In-process Hugging Face transformers backend (optionally with a PEFT adapter)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llmrec.llm.base import (
    Backend,
    BackendError,
    OptionTrie,
    check_first_tokens,
    check_max_new_tokens,
    cut_at_stop,
    normalize_choices,
    quote_token_sets,
    quoted_state,
)
from llmrec.llm.loading import (
    BASE_FILE,
    QuantSettings,
    adapter_base_dtype,
    adapter_base_quant,
    load_adapter,
    load_causal_lm,
    load_dequantized_4bit,
)

log = logging.getLogger(__name__)


class TransformersBackend(Backend):
    """Scores and generates with a local causal LM.

    `model`: local HF folder (None = embedded SmolLM2-135M-Instruct); `adapter`: a PEFT folder; `dtype`: "fast"
    (bf16 where the hardware has it, else fp32), "bfloat16", or "float32" (exact parity with other fp32 engines);
    `load_in_4bit`: nf4 base. `merge_adapter` (default): a fixed `adapter` on a full-precision base is merged into the
    weights once at load (PEFT `merge_and_unload`), so each forward runs no LoRA matmuls (1.3x faster scoring in
    bf16 on CPU, 1.1x in fp32; same AUC within float rounding); a 4-bit base keeps the adapter separate (merging
    would re-quantize). An adapter trained on a 4-bit base (its `llmrec_base.json`) gets that base dequantized
    (`load_dequantized_4bit`) unless `load_in_4bit` asks for the 4-bit model itself.
    `base_of_adapter`: an adapter folder whose recorded base this backend loads, as `adapter` would, without
    applying it: the shared base for `add_adapter` of QLoRA adapters (`add_adapter` refuses one whose recorded
    4-bit base is not the base loaded here; `base_weights` describes it).
    `score_choices` uses left padding and `logits_to_keep=1` (one position of logits per prompt), in batches of
    `batch_size` prompts sorted by length, under `torch.inference_mode`. `device`: "auto" (the GPU when there is
    one, else the CPU), "cpu", "cuda" or "cuda:N"; a 4-bit model is placed on the GPU at load already."""

    adapter_merged: bool = False  # True: the fixed adapter was merged into the weights at load

    def __init__(
        self,
        model: str | Path | None = None,
        adapter: str | Path | None = None,
        dtype: str = "fast",
        batch_size: int = 8,
        load_in_4bit: bool = False,
        threads: int | None = None,
        progress: bool = False,
        merge_adapter: bool = True,
        device: str = "auto",
        base_of_adapter: str | Path | None = None,
        **_: Any,
    ):
        import torch

        if adapter and base_of_adapter:
            raise BackendError("give adapter= (the base it was trained on, with it applied) or base_of_adapter= (that "
                               "base alone, for add_adapter), not both")
        if threads:
            torch.set_num_threads(int(threads))
        quant = QuantSettings(load_in_4bit=load_in_4bit, compute_dtype=dtype if dtype != "auto" else "fast")
        like = adapter or base_of_adapter
        trained_on = adapter_base_quant(like) if like else None
        recorded_src = adapter_base_dtype(like) if like else None
        if trained_on is not None and not load_in_4bit:  # QLoRA adapter: its base's dequantized 4-bit weights
            log.info("adapter %s was trained on a %s 4-bit base: loading that base dequantized to %s", like,
                     trained_on.quant_type, dtype)
            m, tok = load_dequantized_4bit(model, trained_on, dtype=dtype, source_dtype=recorded_src)
            base = _base_record("dequantized", trained_on, recorded_src or dtype)
        elif trained_on is not None:
            # served 4-bit: quantized as the adapter's base was (type, double quantization) from the dtype it was read
            # in, so the 4-bit codes are the ones the LoRA was fitted to; computing in the serving dtype
            from dataclasses import replace

            quant = replace(trained_on, load_in_4bit=True, compute_dtype=quant.compute_dtype)
            src = recorded_src or dtype
            log.info("adapter %s was trained on a %s 4-bit base read in %s: quantizing the same way", like,
                     trained_on.quant_type, src)
            m, tok = load_causal_lm(model, dtype=src, quant=quant)
            base = _base_record("4bit", quant, src)
        else:
            if base_of_adapter and not (Path(base_of_adapter).expanduser() / "adapter_config.json").is_file():
                raise BackendError(f"base_of_adapter: {base_of_adapter} has no adapter_config.json (not a PEFT "
                                   "adapter folder)")
            m, tok = load_causal_lm(model, dtype=dtype, quant=quant)
            base = _base_record("4bit", quant, dtype) if load_in_4bit else None
        if load_in_4bit:  # inference only: the forward guard is for training
            guard = getattr(m, "_llmrec_guard", None)
            if guard is not None:
                guard.remove()
        merged = False
        if adapter:
            quantized = load_in_4bit or bool(getattr(m, "is_loaded_in_4bit", False))
            m = load_adapter(m, adapter)
            if merge_adapter and not quantized:
                m = m.merge_and_unload()
                merged = True
                log.info("adapter %s merged into the base weights for inference (merge_adapter=False keeps it "
                         "separate)", adapter)
        target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if target.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r}: no CUDA device is available here")
        # a 4-bit model (quantized at load, or a saved 4-bit copy) is placed by its device_map; transformers refuses
        # `.to()` on bitsandbytes models
        quantized = load_in_4bit or bool(getattr(m, "is_loaded_in_4bit", False))
        if not quantized and next(m.parameters()).device != torch.device(target):
            m = m.to(target)
        self._init(m, tok, batch_size=batch_size, progress=progress)
        self._fixed_adapter = bool(adapter)
        self.base_weights = base
        self.model_name = Path(str(model)).name if model else "smollm2-135m-instruct"
        self.name = f"transformers:{self.model_name}" + (":4bit" if load_in_4bit else "") + (
            f"+{Path(str(adapter)).name}" if adapter else "")
        self.adapter_merged = merged

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, batch_size: int = 8, name: str = "transformers:in-memory",
                   progress: bool = False) -> TransformersBackend:
        """Wrap an already loaded model/tokenizer (e.g. during training); the tokenizer is switched to left padding."""
        self = object.__new__(cls)
        self._init(model, tokenizer, batch_size=batch_size, progress=progress)
        self.name = name
        self.model_name = Path(str(getattr(model.config, "name_or_path", "") or "in-memory")).name
        return self

    def _init(self, model: Any, tokenizer: Any, batch_size: int, progress: bool) -> None:
        import threading

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        # shared with every `with_adapter` view: the model (wrapped in a PeftModel by the first add_adapter), the
        # adapters loaded into it by name, and the lock under which a call switches the active adapter (model state)
        self._shared: dict[str, Any] = {"model": model, "adapters": {}, "lock": threading.RLock()}
        self._tok = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self._first_ids: dict[str, int] = {}
        self._quote_sets: tuple[list[int], list[int]] | None = None  # (quote-character tokens, lone opening quotes)
        self._active: str | None = None  # this view's adapter; None = the base model (adapters disabled)

    @property
    def model(self) -> Any:
        return self._shared["model"]

    @model.setter
    def model(self, value: Any) -> None:
        self._shared["model"] = value

    @property
    def _adapters(self) -> dict[str, str]:
        return self._shared["adapters"]

    @property
    def _lock(self) -> Any:
        return self._shared["lock"]

    # ------------------------------------------------------------------ several adapters on one base model
    def add_adapter(self, name: str, path: str | Path) -> TransformersBackend:
        """Load a PEFT adapter into this backend's model under `name` (the base weights are shared: one model in
        memory for any number of adapters, instead of a model per adapter). Returns `with_adapter(name)`."""
        from peft import PeftModel

        if getattr(self, "_fixed_adapter", False):
            raise BackendError("add_adapter needs a base backend (built without adapter=); this one was built "
                               "around one fixed adapter")
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise BackendError(f"adapter {name!r}: {p} has no adapter_config.json (not a PEFT adapter folder)")
        self._check_adapter_base(name, p)
        with self._lock:
            if name in self._adapters:
                raise BackendError(f"adapter {name!r} is already loaded (from {self._adapters[name]})")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(p), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(p), adapter_name=name)
            self.model.eval()
            self._adapters[name] = str(p)
        return self.with_adapter(name)

    def _check_adapter_base(self, name: str, path: Path) -> None:
        """BackendError when adapter `path` was fitted to a 4-bit base (`llmrec_base.json`) that is not the base this
        backend holds: on the original weights such an adapter scores otherwise than it was trained to (ML-100K
        Yes/No, the bench adapter on 200 validation rows: accuracy 0.67 on its dequantized base, 0.41 on the original
        bf16 weights; P(Yes) > 0.5 on 6.5% of rows instead of 61%). A plain adapter on a 4-bit or dequantized base is
        the caller's choice (logged)."""
        trained_on = adapter_base_quant(path)
        have = getattr(self, "base_weights", None)
        if trained_on is None:
            if have is not None:
                log.info("adapter %r was trained on a full-precision base; this backend's base is %s 4-bit (%s)",
                         name, have["quant_type"], have["form"])
            return
        want = _base_record("dequantized", trained_on, adapter_base_dtype(path))
        if have is None:
            raise BackendError(
                f"adapter {name!r} ({path}) was trained on a {trained_on.quant_type} 4-bit base ({BASE_FILE}), but "
                "this backend holds the original full-precision weights, on which it scores otherwise than trained "
                "(ML-100K Yes/No: accuracy 0.67 -> 0.41); build the base backend with base_of_adapter=<that adapter "
                "folder> (its dequantized 4-bit base) or load_in_4bit=True, or serve it alone (adapter=, or merged)")
        if (have["quant_type"], have["double_quant"]) != (want["quant_type"], want["double_quant"]):
            raise BackendError(
                f"adapter {name!r} ({path}) was trained on a {want['quant_type']} 4-bit base (double_quant="
                f"{want['double_quant']}), this backend's base is {have['quant_type']} (double_quant="
                f"{have['double_quant']}): adapters sharing one base must have been trained on the same one")
        if want["source_dtype"] and have["source_dtype"] and want["source_dtype"] != have["source_dtype"]:
            log.warning("adapter %r: its 4-bit base was quantized from %s weights, this backend's from %s (a few "
                        "4-bit codes can differ)", name, want["source_dtype"], have["source_dtype"])

    def with_adapter(self, name: str | None) -> TransformersBackend:
        """A view of this backend that runs with adapter `name` active (None: the base model, adapters disabled).
        Views share the model, tokenizer and lock, so they are safe to call from several threads."""
        if name is not None and name not in self._adapters:
            raise BackendError(f"unknown adapter {name!r}; loaded: {sorted(self._adapters)}")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._active = name
        base = self.name.split("+")[0]
        view.name = f"{base}+{name}" if name else base
        return view

    @contextlib.contextmanager
    def _eval_mode(self) -> Any:
        """The model in eval mode for one call, its training mode given back after (a backend may score a model
        that is being fine-tuned: the trainer's evaluation)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    def _forward_context(self) -> Any:
        """Make this view's adapter the active one for the duration of a call (caller holds the lock)."""
        if not self._adapters:
            return contextlib.nullcontext()
        if self._active is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self._active)
        return contextlib.nullcontext()

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def first_token_id(self, choice: str) -> int:
        tid = self._first_ids.get(choice)
        if tid is None:
            ids = self._tok.encode(choice, add_special_tokens=False)
            if not ids:
                raise BackendError(f"choice {choice!r} encodes to no tokens")
            tid = self._first_ids[choice] = int(ids[0])
        return tid

    def _batches(self, prompts: list[str]) -> list[list[int]]:
        lens = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -lens[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def next_token_logits(self, prompts: list[str]) -> Any:
        """[n, vocab] float32 logits at the next position for each prompt (torch tensor on CPU), as the model
        computes them (in its dtype, then widened)."""
        return self._next_position(prompts, None)

    def choice_logits(self, prompts: list[str], ids: Any) -> Any:
        """[n, k] float32 logits of token ids `ids` ([n, k] long tensor) at the next position of each prompt,
        computed in float32 from the LM head's input (the final hidden state) and the head's rows for those ids.

        In bf16 the model's own logits are rounded to 8 significant bits: at the magnitudes of a 135M model's
        logits (10-30) two answers' logits differ in steps of 0.06-0.125, so P(Yes) over 1,000 test rows took only
        24 distinct values and most rows tied. The float32 dot product keeps what the hidden state tells apart.
        Used when the head is a plain `nn.Linear` and the model applies no logit transform (softcapping, scaling);
        each batch is also checked against the model's own logits, and a batch outside bf16 rounding of them uses
        those instead (logged once)."""
        return self._next_position(prompts, ids)

    def _plain_head(self) -> Any:
        import torch

        head = self.model.get_output_embeddings()
        cfg = getattr(self.model, "config", None)
        transformed = any(getattr(cfg, k, None) not in (None, 1, 1.0)
                          for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        return head if type(head) is torch.nn.Linear and not transformed else None

    def _next_position(self, prompts: list[str], ids: Any | None) -> Any:
        import torch

        k = 0 if ids is None else int(ids.shape[1])
        out = torch.empty((len(prompts), k))
        rows: dict[int, Any] = {}
        seen: list[Any] = []
        with self._lock, self._eval_mode(), self._forward_context(), torch.inference_mode():
            # hooked under the lock: views share the model, and each call's hook sees its own forwards only
            head = self._plain_head() if ids is not None else None
            hook = None if head is None else head.register_forward_hook(lambda _m, i, _o: seen.append(i[0]))
            try:
                for b in tqdm(self._batches(prompts), desc="score", leave=False, disable=not self.progress):
                    enc = self._tok([prompts[i] for i in b], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.device)
                    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                    seen.clear()
                    logits = self.model(**enc, position_ids=pos, logits_to_keep=1).logits[:, -1, :].float()
                    if ids is not None:
                        logits = self._choice_rows(logits, ids[b], head, seen)
                    logits = logits.cpu()
                    for j, i in enumerate(b):
                        rows[i] = logits[j]
            finally:
                if hook is not None:
                    hook.remove()
        if rows:
            out = torch.stack([rows[i] for i in range(len(prompts))])
        return out

    def _choice_rows(self, logits: Any, ids: Any, head: Any, seen: list[Any]) -> Any:
        """[B, k]: the float32 head's logits for `ids` when the hook caught the head's input once and they agree
        with the model's own `logits` ([B, vocab]) within bf16 rounding; else the model's."""
        import torch

        sel = ids.to(logits.device)
        own = torch.gather(logits, 1, sel)
        if head is None or len(seen) != 1:
            return own
        fine = torch.einsum("bh,bkh->bk", seen[0][:, -1, :].float(), head.weight[sel].float())
        if head.bias is not None:
            fine = fine + head.bias[sel].float()
        # bf16 rounding of the model's logits is < 2^-8 relative; a margin for the rounding of the matmul's inputs
        if bool(((fine - own).abs() <= 0.02 * own.abs() + 0.05).all()):
            return fine
        if not getattr(self, "_warned_head", False):
            self._warned_head = True
            log.warning("choice logits: the float32 head disagrees with the model's logits (a logit transform?); "
                        "using the model's own logits")
        return own

    def score_choices(self, prompts: list[str], choices: list[list[str]] | list[str]) -> np.ndarray:
        import torch

        if not prompts:  # shaped as the vLLM backend answers: [0, n] for one shared choice list
            return np.zeros((0, len(choices) if choices and isinstance(choices[0], str) else 0))
        per = normalize_choices(prompts, choices)
        first = [[self.first_token_id(c) for c in cs] for cs in per]
        check_first_tokens(per, first)
        ids = torch.tensor(first, dtype=torch.long)
        sel = self.choice_logits(prompts, ids)
        return torch.log_softmax(sel, dim=-1).numpy().astype(np.float64)

    def score_continuations(self, prompts: list[str], continuations: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Per batch of prompts: one forward over the left-padded prompts keeps their KV cache, which is repeated
        once per continuation; one more forward over the right-padded continuation tokens reads every token's
        log-prob (a prompt's tokens are computed once, not once per continuation)."""
        import torch

        per = normalize_choices(prompts, continuations)
        if not per:
            return np.zeros((0, 0)), np.zeros((0, 0))
        k = len(per[0])
        ids = [[self._continuation_ids(c) for c in cs] for cs in per]
        sums = np.zeros((len(prompts), k))
        counts = np.array([[len(t) for t in row] for row in ids], dtype=np.float64)
        with self._lock, self._eval_mode(), self._forward_context(), torch.inference_mode():
            for b in tqdm(self._batches(prompts), desc="continuations", leave=False, disable=not self.progress):
                enc = self._tok([prompts[i] for i in b], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(self.device)
                mask = enc["attention_mask"]
                out = self.model(**enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                                 logits_to_keep=1)
                first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [B, vocab]
                cache = out.past_key_values
                cache.batch_repeat_interleave(k)  # row j * k + c: prompt j, continuation c
                rows = [ids[i][c] for i in b for c in range(k)]
                m = max(len(t) for t in rows)
                x = torch.full((len(rows), m), int(self._tok.pad_token_id), dtype=torch.long)
                cmask = torch.zeros((len(rows), m), dtype=torch.long)
                for r, t in enumerate(rows):
                    x[r, : len(t)] = torch.tensor(t)
                    cmask[r, : len(t)] = 1
                x, cmask = x.to(self.device), cmask.to(self.device)
                plen = mask.sum(-1).repeat_interleave(k)
                pos = plen[:, None] + torch.arange(m, device=self.device)[None, :]
                full = torch.cat([mask.repeat_interleave(k, dim=0), cmask], dim=1)
                logits = self.model(input_ids=x, attention_mask=full, position_ids=pos,
                                    past_key_values=cache).logits[:, :-1, :].float()
                # token t of a continuation: from the prompt's last position (t = 0), else from position t - 1
                # (log-softmax read at the token only: logit - logsumexp, no second vocabulary-sized tensor)
                tok_lp = (torch.gather(logits, 2, x[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1))
                tok_lp = tok_lp * cmask[:, 1:]
                head = torch.gather(first, 1, x[:, 0].view(len(b), k)).reshape(-1)  # rows j * k + c, as x's
                total = (head + tok_lp.sum(-1)).cpu().numpy()
                for j, i in enumerate(b):
                    sums[i] = total[j * k : (j + 1) * k]
        return sums, counts

    def _continuation_ids(self, text: str) -> list[int]:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BackendError(f"continuation {text!r} encodes to no tokens")
        return list(ids)

    def _generate_tokens(self, prompts: list[str], max_new_tokens: int, desc: str,
                         extra: Callable[[list[int], int], dict[str, Any]] | None = None,
                         temperature: float = 0.0, stop: list[str] | None = None,
                         frequency_penalty: float = 0.0) -> dict[int, list[int]]:
        """The new token ids per prompt (index -> ids), generated in left-padded batches under the lock with the
        view's adapter active; greedy at temperature 0. `extra(batch_indices, start)` adds generate() arguments for
        a batch whose generated tokens begin at column `start` (constraints); a non-zero `frequency_penalty` runs
        before its logits processors (`frequency_penalty_processor`)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        out: dict[int, list[int]] = {}
        with self._lock, self._eval_mode(), self._forward_context(), torch.inference_mode():
            for b in tqdm(self._batches(prompts), desc=desc, leave=False, disable=not self.progress):
                enc = self._tok([prompts[i] for i in b], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(self.device)
                start = enc["input_ids"].shape[1]
                kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self._tok.pad_token_id}
                if temperature and temperature > 0:
                    kw.update(do_sample=True, temperature=float(temperature))
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if stop and any(stop):  # stop decoding at a stop string (the text is still cut after: rows end
                    # unevenly); looked for in the generated text only, as vLLM does (transformers' own `stop_strings`
                    # also match across the end of the prompt: "\n\n" after a prompt ending in "\n" stopped at once)
                    kw["stopping_criteria"] = StoppingCriteriaList([stop_text_criteria(self._tok, start, stop)])
                if extra is not None:
                    kw.update(extra(b, start))
                if frequency_penalty:
                    kw["logits_processor"] = LogitsProcessorList(
                        [frequency_penalty_processor(start, frequency_penalty), *kw.get("logits_processor", [])])
                gen = self.model.generate(**enc, **kw)
                for j, i in enumerate(b):
                    out[i] = gen[j, start:].tolist()
        return out

    def _decode(self, ids: list[int], stop: list[str] | None) -> str:
        return cut_at_stop(self._tok.decode(ids, skip_special_tokens=True), stop)

    def generate_from(self, prompts: list[str], options: list[list[str]], n: int, sep: str = "\n") -> list[list[int]]:
        """Constrained greedy decoding through `prefix_allowed_tokens_fn`: each option + `sep` is tokenized on its own
        and the model may only continue along those token sequences (see `OptionTrie`)."""
        if len(options) != len(prompts):
            raise ValueError(f"generate_from: {len(options)} option lists for {len(prompts)} prompts")
        eos = self._tok.eos_token_id
        if eos is None:
            raise BackendError(f"{self.name}: the tokenizer has no end-of-sequence token (needed to stop)")
        todo = [i for i, opts in enumerate(options) if opts and n > 0]
        tries = {i: OptionTrie([self._tok.encode(o + sep, add_special_tokens=False) for o in options[i]], n, eos)
                 for i in todo}

        def extra(b: list[int], start: int) -> dict[str, Any]:
            def allowed(row: int, ids: Any) -> list[int]:
                return tries[todo[b[row]]].walk(ids[start:].tolist())[1]

            return {"max_new_tokens": max(tries[todo[i]].max_new_tokens() for i in b), "eos_token_id": eos,
                    "prefix_allowed_tokens_fn": allowed}

        gen = self._generate_tokens([prompts[i] for i in todo], 0, "generate_from", extra)
        out: list[list[int]] = [[] for _ in prompts]
        for k, i in enumerate(todo):
            out[i] = tries[i].walk(gen[k])[0]
        return out

    def generate_quoted(self, prompts: list[str], quotable: list[list[str]], max_new_tokens: int = 64,
                        stop: list[str] | None = None, frequency_penalty: float = 0.0,
                        lead_quote: bool = False) -> list[str]:
        """Greedy generation through a logits processor: outside quotes every token containing a quote character is
        masked except a lone opening quote ('"' or ' "', only while an unused option is left); inside a quote only
        the tokens of an unused option + closing quote (each tokenized on its own) are allowed. `lead_quote`: the
        first token must be a lone opening quote (for prompts with something to quote)."""
        from transformers import LogitsProcessorList

        if len(quotable) != len(prompts):
            raise ValueError(f"generate_quoted: {len(quotable)} quotable lists for {len(prompts)} prompts")
        check_max_new_tokens(max_new_tokens)
        if self._quote_sets is None:
            self._quote_sets = quote_token_sets(self._tok)
        quote_ids, open_ids = self._quote_sets
        eos = self._tok.eos_token_id
        tries = [OptionTrie([self._tok.encode(q + '"', add_special_tokens=False) for q in qs], len(qs), eos)
                 if qs else None for qs in quotable]

        def extra(b: list[int], start: int) -> dict[str, Any]:
            proc = quoted_span_processor([tries[i] for i in b], start, quote_ids, open_ids, lead_quote)
            return {"logits_processor": LogitsProcessorList([proc])}

        gen = self._generate_tokens(prompts, max_new_tokens, "generate_quoted", extra, stop=stop,
                                    frequency_penalty=frequency_penalty)
        return [self._decode(gen[i], stop) for i in range(len(prompts))]

    def generate(
        self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, stop: list[str] | None = None,
        frequency_penalty: float = 0.0,
    ) -> list[str]:
        check_max_new_tokens(max_new_tokens)
        gen = self._generate_tokens(prompts, max_new_tokens, "generate", temperature=temperature, stop=stop,
                                    frequency_penalty=frequency_penalty)
        return [self._decode(gen[i], stop) for i in range(len(prompts))]


def _base_record(form: str, quant: QuantSettings, source_dtype: str | None) -> dict[str, Any]:
    """`TransformersBackend.base_weights`: a 4-bit base ("4bit") or its dequantized weights ("dequantized"), with the
    quantization and the dtype the weights were read in before it (None: not recorded)."""
    from llmrec.llm.loading import resolve_dtype

    src = None if source_dtype in (None, "auto") else resolve_dtype(source_dtype)
    return {"form": form, "quant_type": quant.quant_type, "double_quant": bool(quant.double_quant),
            "source_dtype": src}


def stop_text_criteria(tokenizer: Any, start: int, stop: list[str]) -> Any:
    """A transformers StoppingCriteria: a row is done once its generated text (`input_ids[:, start:]`, decoded as
    `generate` returns it) contains one of the `stop` strings; the prompt's text is not searched."""
    import torch
    from transformers import StoppingCriteria

    stops = [s for s in stop if s]

    class StopText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return StopText()


def frequency_penalty_processor(start: int, penalty: float) -> Any:
    """A transformers LogitsProcessor with OpenAI's / vLLM's `frequency_penalty`: each token's logit minus `penalty`
    x the times it occurs among the generated tokens (`input_ids[:, start:]`); the prompt's tokens are not counted
    (transformers' own `repetition_penalty` counts them, so it would also penalize copying a title from the prompt)."""
    import torch
    from transformers import LogitsProcessor

    class FrequencyPenalty(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            gen = input_ids[:, start:]
            if gen.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones(gen.shape, dtype=scores.dtype,
                                                                               device=scores.device))
            return scores - penalty * counts

    return FrequencyPenalty()


def quoted_span_processor(
    tries: list[OptionTrie | None], start: int, quote_ids: list[int], open_ids: list[int], lead_quote: bool = False
) -> Any:
    """A transformers LogitsProcessor for `generate_quoted` over a batch: row r follows `tries[r]` (None: no quote
    allowed at all); `start` = where generation begins in `input_ids`. Outside quotes every quote-character token is
    masked except the lone opening quotes `open_ids`, and those too once every option is used; inside a quote only
    the trie's continuations of unused options are kept. `lead_quote`: at the first generated position a row with a
    trie may only open a quote."""
    import torch
    from transformers import LogitsProcessor

    opens = set(open_ids)
    open_t = torch.tensor(sorted(opens), dtype=torch.long)
    ban_all = torch.tensor(sorted(quote_ids), dtype=torch.long)
    ban_free = torch.tensor(sorted(set(quote_ids) - opens), dtype=torch.long)

    class QuotedSpans(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for row, trie in enumerate(tries):
                if trie is None:
                    scores[row, ban_all] = float("-inf")
                    continue
                if lead_quote and input_ids.shape[1] == start:
                    keep = scores[row, open_t].clone()
                    scores[row] = float("-inf")
                    scores[row, open_t] = keep
                    continue
                inside, used = quoted_state(trie, input_ids[row, start:].tolist(), opens)
                if inside is None:
                    scores[row, ban_all if len(used) >= len(trie.lengths) else ban_free] = float("-inf")
                else:
                    keep = scores[row, inside].clone()
                    scores[row] = float("-inf")
                    scores[row, inside] = keep
            return scores

    return QuotedSpans()
