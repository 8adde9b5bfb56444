"""Slow checks on the embedded SmolLM2-135M-Instruct (make test-slow): conversion, scoring, 4-bit + LoRA step."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_default_model_scores_yes_no():
    from llmrec.llm import default_model_path, load_backend

    path = default_model_path()
    assert (path / "config.json").is_file() and default_model_path() == path  # converted once, then reused
    be = load_backend("transformers", dtype="bfloat16")
    assert be.tokenizer.encode(" Yes") == [9230] and be.tokenizer.encode(" No") == [2838]
    s = be.score_choices(["Is Paris the capital of France? Answer Yes or No.\nAnswer:"], [" Yes", " No"])
    np.testing.assert_allclose(np.exp(s).sum(1), 1.0, atol=1e-5)
    assert s[0, 0] > s[0, 1]


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
