"""vLLM backend (needs vllm: `make test-vllm`): choice scoring equals the transformers reference, 20 letter choices
are all scored, the HTTP server works with the official openai client, and adapters are served by name."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

PROMPTS = [
    "The user liked: Toy Story (1995); Heat (1995). Will the user like Casino (1995)? Answer Yes or No.\nAnswer:",
    "Candidates:\n" + "\n".join(f"{chr(65 + i)}. Movie {i}" for i in range(20)) + "\nThe best candidate is letter",
]
LETTERS = [f" {chr(65 + i)}" for i in range(20)]


GEN_PROMPTS = [
    "A user's movies, oldest first.\n- \"Toy Story (1995)\"\n- \"Babe (1995)\"\nWhat is the title of the next movie "
    "the user will enjoy?\nTitle:",
    "A user's movies, oldest first.\n- \"Heat (1995)\"\n- \"Casino (1995)\"\nWhat is the title of the next movie "
    "the user will enjoy?\nTitle:",
]
GEN_OPTIONS = [[' "Aladdin (1992)"', ' "Fargo (1996)"', ' "Pocahontas (1995)"', ' "Se7en (1995)"',
                ' "Jumanji (1995)"']] * 2


EXPLAIN_PROMPT = ('A user\'s movies, oldest first.\n- "Heat (1995)" (liked)\n- "Fargo (1996)" (liked)\n'
                  '- "Babe (1995)" (disliked)\nRecommended movies:\n- "Casino (1995)"\n'
                  'In one or two sentences, explain why these movies suit this user.\n'
                  'Explanation: Because the user liked')


def transformers_picks(model_dir: str) -> list[list[int]]:
    from llmrec.llm import load_backend

    return load_backend("transformers", model=model_dir, dtype="float32").generate_from(GEN_PROMPTS, GEN_OPTIONS, n=3)


def transformers_continuations(model_dir: str) -> tuple[np.ndarray, np.ndarray]:
    from llmrec.llm import load_backend

    return load_backend("transformers", model=model_dir, dtype="float32").score_continuations(GEN_PROMPTS, GEN_OPTIONS)


def check_continuations(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    """Same token counts, log-prob sums within fp32 engine differences; the same title order per prompt."""
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], atol=5e-2)
    assert [list(np.argsort(-r)) for r in got[0] / got[1]] == [list(np.argsort(-r)) for r in ref[0] / ref[1]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir():
    from llmrec.llm.loading import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="module")
def reference(model_dir):
    """log-softmax over the choices' first-token logits from transformers in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ref(prompt, choices):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        sel = logits[[tok.encode(c, add_special_tokens=False)[0] for c in choices]]
        return torch.log_softmax(sel, -1).numpy()

    return ref


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "test-adapter"
    peft.save_pretrained(out)
    return str(out)


def test_in_process_scoring_matches_transformers(model_dir, reference):
    from llmrec.llm.vllm_backend import VLLMBackend

    be = VLLMBackend(model=model_dir, dtype="float32", llm_kwargs={"enforce_eager": True})
    try:
        yn = be.score_choices(PROMPTS, [" Yes", " No"])
        let = be.score_choices(PROMPTS, LETTERS)
        assert yn.shape == (2, 2) and let.shape == (2, 20)
        np.testing.assert_allclose(np.exp(let).sum(axis=1), 1.0, atol=1e-6)
        for i, p in enumerate(PROMPTS):
            np.testing.assert_allclose(yn[i], reference(p, [" Yes", " No"]), atol=2e-2)
            np.testing.assert_allclose(let[i], reference(p, LETTERS), atol=2e-2)
        out = be.generate(PROMPTS[:1], max_new_tokens=4)
        assert len(out) == 1 and isinstance(out[0], str)
        # constrained generation (structured-output choice rounds) writes what the transformers trie walk writes
        picks = be.generate_from(GEN_PROMPTS, GEN_OPTIONS, n=3)
        assert picks == transformers_picks(model_dir)
        # title likelihood (the `likelihood` ranking mode): the transformers backend's sums, prompt logprobs here
        check_continuations(be.score_continuations(GEN_PROMPTS, GEN_OPTIONS), transformers_continuations(model_dir))
        # quoted spans limited to the allowed strings (a regex; repeats are the caller's check)
        allowed = ["Heat (1995)", "Fargo (1996)"]
        outs = be.generate_quoted([EXPLAIN_PROMPT, EXPLAIN_PROMPT], [allowed, []], max_new_tokens=40, stop=["\n"])
        spans = outs[0].split('"')[1::2]
        assert spans and all(x in allowed for x in spans), outs[0]
        assert '"' not in outs[1]
        # explain v3: the text must open with a quoted allowed title; the frequency penalty goes to SamplingParams
        v3 = EXPLAIN_PROMPT.replace("Because the user liked", '"Casino (1995)" suits this user because they liked')
        led = be.generate_quoted([v3, v3], [allowed, []], max_new_tokens=40, stop=["\n"], lead_quote=True,
                                 frequency_penalty=1.0)
        assert re.match(r' ?"(Heat \(1995\)|Fargo \(1996\))"', led[0]), led[0]
        assert '"' not in led[1]
    finally:
        be.close()
        del be


def test_server_openai_client_and_adapters(model_dir, reference, adapter_dir):
    from openai import OpenAI

    from llmrec.llm.vllm_backend import VLLMBackend, VLLMError
    from llmrec.service.launch import VLLMServer

    srv = VLLMServer(model_dir, port=free_port(), dtype="float32", lora_modules={"test": adapter_dir},
                     max_lora_rank=8, extra_args=["--enforce-eager"])
    with srv:
        be = VLLMBackend(url=srv.url, model=model_dir)
        let = be.score_choices(PROMPTS, LETTERS)
        for i, p in enumerate(PROMPTS):
            np.testing.assert_allclose(let[i], reference(p, LETTERS), atol=2e-2)
        lora = be.with_adapter("test")
        assert not np.allclose(lora.score_choices(PROMPTS, LETTERS), let, atol=1e-3)  # the adapter is applied
        client = OpenAI(base_url=srv.url, api_key="unused")
        assert {m.id for m in client.models.list().data} >= {model_dir, "test"}
        r = client.completions.create(model="test", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert r.model == "test" and isinstance(r.choices[0].text, str)
        assert be.generate_from(GEN_PROMPTS, GEN_OPTIONS, n=3) == transformers_picks(model_dir)
        # prompt log-probs on a LoRA-enabled engine kill it (vLLM 0.32 CPU): refused with a clear error instead, and
        # the server keeps answering
        with pytest.raises(VLLMError, match="LoRA enabled"):
            be.score_continuations(GEN_PROMPTS, GEN_OPTIONS)
        quoted = be.generate_quoted([EXPLAIN_PROMPT], [["Heat (1995)", "Fargo (1996)"]], max_new_tokens=40)[0]
        spans = quoted.split('"')[1::2]
        assert spans and all(x in ("Heat (1995)", "Fargo (1996)") for x in spans), quoted
        with pytest.raises(Exception, match="not served"):
            VLLMBackend(url=srv.url, model="nope")
        be.close()
