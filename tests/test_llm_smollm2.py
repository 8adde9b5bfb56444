"""Slow checks on the embedded SmolLM2-135M-Instruct (make test-slow): conversion, scoring, 4-bit + LoRA step."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_default_model_scores_yes_no():
    from llmrec.llm import default_model_path, load_backend

    path = default_model_path()
    assert (path / "config.json").is_file() and default_model_path() == path  # converted once, then reused
    be = load_backend("transformers", dtype="float32")
    assert be.tokenizer.encode(" Yes") == [9230] and be.tokenizer.encode(" No") == [2838]
    prompts = ["Is Paris the capital of France? Answer Yes or No.\nAnswer:",
               "A user liked Toy Story and Aladdin. Will the user enjoy the movie Heat? Answer Yes or No.\nAnswer:"]
    s = be.score_choices(prompts, [" Yes", " No"])
    np.testing.assert_allclose(np.exp(s).sum(1), 1.0, atol=1e-5)
    # batched, left-padded scoring equals one unpadded forward pass per prompt on the model itself (fp32: in bf16
    # the padding moves the rounding, and the model's own bf16 logits are rounded to 8 bits)
    import torch

    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = torch.tensor([be.tokenizer.encode(p)])
            last = be.model(input_ids=ids).logits[0, -1].float()
            ref = torch.log_softmax(last[[9230, 2838]], dim=-1).numpy()
            np.testing.assert_allclose(s[i], ref, atol=1e-3)
    assert abs(s[0, 0] - s[1, 0]) > 1e-3  # the answer depends on the prompt
    # bf16 (dtype fast on a CPU with AVX512-BF16) stays near fp32: 0.053 apart at most on these prompts (2026-12-06)
    s16 = load_backend("transformers", dtype="bfloat16").score_choices(prompts, [" Yes", " No"])
    np.testing.assert_allclose(np.exp(s16).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(s16, s, atol=0.15)


def test_smollm2_4bit_lora_step_trains_only_lora():
    import torch

    from llmrec.llm import (
        LoraSettings,
        QuantSettings,
        apply_lora,
        check_4bit_shapes,
        default_model_path,
        load_causal_lm,
    )

    check_4bit_shapes(default_model_path())  # 576/1536/192 are multiples of 32
    m, tok = load_causal_lm(None, quant=QuantSettings(load_in_4bit=True))
    m = apply_lora(m, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([tok.encode("The user liked Toy Story. Will the user like Heat? Answer: Yes")])
    labels = ids.clone()
    labels[:, :-1] = -100
    m(input_ids=ids, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)


def test_smollm2_quoted_titles_are_the_allowed_ones():
    """The embedded model quotes titles readily (and invents some when free); under generate_quoted every quoted
    span is one of the allowed titles, none twice."""
    from llmrec.llm import load_backend

    be = load_backend("transformers", dtype="float32")
    prompt = ('A user\'s movies, oldest first.\n- "Heat (1995)" (liked)\n- "Fargo (1996)" (liked)\n'
              '- "Babe (1995)" (disliked)\nRecommended movies:\n- "Casino (1995)"\n'
              'In one or two sentences, explain why these movies suit this user.\n'
              'Explanation: Because the user liked')
    allowed = ["Heat (1995)", "Fargo (1996)"]
    free = be.generate([prompt], max_new_tokens=60)[0]
    got = be.generate_quoted([prompt, prompt], [allowed, []], max_new_tokens=60)
    spans = got[0].split('"')[1::2]
    assert spans, (free, got[0])  # the model does quote
    assert all(s in allowed for s in spans) and len(set(spans)) == len(spans), got[0]
    assert '"' not in got[1]
