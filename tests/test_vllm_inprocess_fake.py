"""VLLMBackend's in-process path (`vllm.LLM`) against a fake `vllm` module whose engine runs a tiny transformers model
(no vllm needed): it tokenizes text prompts as vLLM does (the tokenizer's special tokens added unless
`tokenization_kwargs` says otherwise; here a BOS, as Llama-style tokenizers add) and validates `SamplingParams` as
vLLM 0.32 does (`logprobs` at most `max_logprobs`, 20 by default)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.llm.transformers_backend import TransformersBackend  # noqa: E402
from llmrec.llm.vllm_backend import VLLM_CPU_ENV, VLLMBackend  # noqa: E402

PROMPTS = [
    "The user watched Action Story 1 and Comedy Story 2. Will the user like Horror Story 4? Answer:",
    "Candidates: A. Action Story B. Comedy Story. Answer:",
    "liked movie Answer:",
]
MAX_LOGPROBS = 20  # vLLM's default ModelConfig.max_logprobs


class FakeSamplingParams:
    def __init__(self, max_tokens=16, temperature=1.0, logprobs=None, logprob_token_ids=None, stop=None,
                 ignore_eos=False, frequency_penalty=0.0, allowed_token_ids=None, prompt_logprobs=None, **_):
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise ValueError(f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
                             f"{MAX_LOGPROBS}")
        if logprob_token_ids is not None and logprobs is not None and logprobs != len(logprob_token_ids):
            raise ValueError("logprobs must equal len(logprob_token_ids)")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        self.max_tokens, self.logprob_token_ids, self.allowed_token_ids = max_tokens, logprob_token_ids, \
            allowed_token_ids


class FakeLLM:
    """Greedy decoding with a transformers model; a text prompt gets a BOS (the end token of the tiny tokenizer)
    unless `tokenization_kwargs={"add_special_tokens": False}`."""

    def __init__(self, model: str, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kw = kw
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def get_tokenizer(self):
        return self.tok

    def _ids(self, prompt, tokenization_kwargs) -> list[int]:
        if isinstance(prompt, dict):
            return list(prompt["prompt_token_ids"])
        ids = self.tok.encode(prompt, add_special_tokens=False)
        if (tokenization_kwargs or {}).get("add_special_tokens", True):
            ids = [self.tok.eos_token_id, *ids]
        return ids

    def generate(self, prompts, sampling_params, use_tqdm=False, lora_request=None, tokenization_kwargs=None):
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        out = []
        for p, sp in zip(prompts, sps):
            ids = self._ids(p, tokenization_kwargs)
            gen: list[int] = []
            first_lp = None
            for _ in range(sp.max_tokens):
                with torch.no_grad():
                    lp = torch.log_softmax(self.model(input_ids=torch.tensor([ids + gen])).logits[0, -1], -1)
                if first_lp is None:
                    first_lp = lp
                masked = lp if sp.allowed_token_ids is None else torch.full_like(lp, -1e9).index_copy(
                    0, torch.tensor(sp.allowed_token_ids), lp[sp.allowed_token_ids])
                t = int(masked.argmax())
                if t == self.tok.eos_token_id:
                    break
                gen.append(t)
            lps = None
            if sp.logprob_token_ids:
                lps = [{t: SimpleNamespace(logprob=float(first_lp[t])) for t in sp.logprob_token_ids}]
            out.append(SimpleNamespace(outputs=[SimpleNamespace(text=self.tok.decode(gen), token_ids=gen,
                                                                logprobs=lps)]))
        return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture()
def fake_vllm(monkeypatch):
    for k, v in VLLM_CPU_ENV.items():  # the backend sets these with setdefault: restored after the test
        monkeypatch.setenv(k, v)
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def test_in_process_scores_and_generates_like_the_transformers_backend(fake_vllm, tiny_dir):
    """Text prompts are tokenized without special tokens (as training and the transformers backend encode them): the
    same choice scores and greedy texts on both backends; more than `max_logprobs` choices are scored too."""
    be = VLLMBackend(model=str(tiny_dir), dtype="float32")
    ref = TransformersBackend(model=tiny_dir, dtype="float32", batch_size=2)
    yes_no = [" Yes", " No"]
    np.testing.assert_allclose(be.score_choices(PROMPTS, yes_no), ref.score_choices(PROMPTS, yes_no), atol=1e-4)
    many = [f" {c}" for c in "ABCDEFGHIJKLMNOPQRST"] + yes_no  # 22 choices, each its own first token
    got = be.score_choices(PROMPTS, many)
    np.testing.assert_allclose(got, ref.score_choices(PROMPTS, many), atol=1e-4)
    assert be.generate(PROMPTS, max_new_tokens=5) == ref.generate(PROMPTS, max_new_tokens=5)
    assert be.generate_from(PROMPTS, [[" Yes", " No"], [" A", " B", " C"], [" liked movie", " gift card"]], n=1) \
        == ref.generate_from(PROMPTS, [[" Yes", " No"], [" A", " B", " C"], [" liked movie", " gift card"]], n=1)


def test_an_adapter_vllm_cannot_apply_as_trained_is_refused_before_the_engine_starts(fake_vllm, tiny_dir, tmp_path,
                                                                                      monkeypatch):
    """A folder that is no PEFT adapter failed inside vLLM after the engine start; a QLoRA adapter (trained on a 4-bit
    base, `llmrec_base.json`) ran silently on the original weights, not the dequantized ones it was fitted to and the
    transformers backend loads for it. Both are refused, naming the folder, before `vllm.LLM` is built."""
    import json

    from llmrec.llm.loading import BASE_FILE
    from llmrec.llm.vllm_backend import VLLMError

    started: list = []
    monkeypatch.setattr(fake_vllm, "LLM", lambda **kw: started.append(kw))
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(VLLMError, match=f"adapter path {empty} has no adapter_config.json"):
        VLLMBackend(model=str(tiny_dir), adapter=str(empty))
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    (qlora / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (qlora / BASE_FILE).write_text(json.dumps({"load_in_4bit": True, "quant_type": "nf4", "double_quant": True}))
    with pytest.raises(VLLMError, match=r"trained on a nf4 4-bit base.*llmrec export --merge"):
        VLLMBackend(model=str(tiny_dir), adapter=str(qlora))
    assert started == []
