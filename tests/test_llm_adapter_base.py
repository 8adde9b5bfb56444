"""Adapters added to a shared base (`TransformersBackend.add_adapter`, the service's LoRA mode) run on the base they
were trained on: a QLoRA adapter (`llmrec_base.json`) on its dequantized 4-bit base, never silently on the original
weights (on ML-100K Yes/No the bench adapter's accuracy fell from 0.67 to 0.41 there)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.config import ConfigError  # noqa: E402
from llmrec.llm import BackendError, QuantSettings, load_backend  # noqa: E402

PROMPTS = ["The user watched Action Story 1 and Comedy Story 2. Will the user like Horror Story 4? Answer:",
           "Candidates: A. Action Story B. Comedy Story. Answer:"]
CH = [" Yes", " No"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_base"))


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """(a QLoRA adapter: nf4 + double quant from fp32, another trained on fp4, a plain one)."""
    pytest.importorskip("bitsandbytes")
    from llmrec.bench_utils import random_lora_adapter
    from llmrec.llm.loading import write_adapter_base

    root = tmp_path_factory.mktemp("adapters")
    q = random_lora_adapter(tiny_dir, root / "q", 1, r=4, target_modules=["q_proj", "v_proj"], std=0.5)
    write_adapter_base(q, QuantSettings(load_in_4bit=True), source_dtype="float32")
    fp4 = random_lora_adapter(tiny_dir, root / "fp4", 2, r=4, target_modules=["q_proj"], std=0.5)
    write_adapter_base(fp4, QuantSettings(load_in_4bit=True, quant_type="fp4"), source_dtype="float32")
    plain = random_lora_adapter(tiny_dir, root / "plain", 3, r=4, target_modules=["o_proj"], std=0.5)
    return q, fp4, plain


def test_a_qlora_adapter_is_refused_on_the_original_weights(tiny_dir, adapters):
    q, _, plain = adapters
    base = load_backend("transformers", model=tiny_dir, dtype="float32")
    assert base.base_weights is None
    with pytest.raises(BackendError, match="4-bit base.*original full-precision weights.*base_of_adapter"):
        base.add_adapter("q", q)
    base.add_adapter("plain", plain)  # trained on a full-precision base: as before


def test_base_of_adapter_serves_it_as_the_fixed_adapter_backend_does(tiny_dir, adapters):
    q, fp4, plain = adapters
    fixed = load_backend("transformers", model=tiny_dir, adapter=q, dtype="float32", merge_adapter=False)
    want = fixed.score_choices(PROMPTS, CH)
    wrong = load_backend("transformers", model=tiny_dir, dtype="float32")
    wrong.model = __import__("peft").PeftModel.from_pretrained(wrong.model, str(q))  # the old add_adapter result
    assert not np.allclose(wrong.score_choices(PROMPTS, CH), want, atol=1e-4)  # the two bases do differ here

    base = load_backend("transformers", model=tiny_dir, dtype="float32", base_of_adapter=q)
    assert base.base_weights == {"form": "dequantized", "quant_type": "nf4", "double_quant": True,
                                 "source_dtype": "float32"}
    view = base.add_adapter("q", q)
    np.testing.assert_allclose(view.score_choices(PROMPTS, CH), want, atol=1e-5)
    with pytest.raises(BackendError, match="fp4 4-bit base.*nf4"):  # another 4-bit base cannot share this one
        base.add_adapter("fp4", fp4)
    base.add_adapter("plain", plain)  # the caller's choice (logged)
    with pytest.raises(BackendError, match="not both"):
        load_backend("transformers", model=tiny_dir, adapter=q, base_of_adapter=q)


def test_the_4bit_base_is_quantized_as_the_adapters_was(tiny_dir, adapters):
    q, fp4, _ = adapters
    base = load_backend("transformers", model=tiny_dir, dtype="float32", load_in_4bit=True, base_of_adapter=fp4)
    assert (base.base_weights["form"], base.base_weights["quant_type"]) == ("4bit", "fp4")
    with pytest.raises(BackendError, match="nf4 4-bit base"):
        base.add_adapter("q", q)
    base.add_adapter("fp4", fp4)
    plain4 = load_backend("transformers", model=tiny_dir, dtype="float32", load_in_4bit=True)
    assert plain4.base_weights["quant_type"] == "nf4"
    plain4.add_adapter("q", q)  # nf4 + double quant: the base it was trained on, quantized again


def test_the_service_loads_qlora_adapters_on_their_base_and_keeps_them_off_vllm_lora(tiny_dir, adapters,
                                                                                     monkeypatch):
    from llmrec.service import launch
    from llmrec.service.config import ServiceConfig

    q, _, plain = adapters

    def cfg(**llm):
        c = ServiceConfig()
        for k, v in {"model": str(tiny_dir), "dtype": "float32", **llm}.items():
            setattr(c.llm, k, v)
        return c

    monkeypatch.setattr(launch, "python_has_vllm", lambda *_: True)
    monkeypatch.setattr(launch, "_has_cuda", lambda: True)  # auto keeps LoRA on a GPU, except for a QLoRA adapter
    assert launch.plan_backend(cfg(adapters={"q": str(q)})).adapter_mode == "merged"
    assert launch.plan_backend(cfg(adapters={"p": str(plain)})).adapter_mode == "lora"
    for c in (cfg(adapters={"q": str(q), "p": str(plain)}), cfg(adapters={"q": str(q)}, adapter_mode="lora")):
        with pytest.raises(ConfigError, match=r"\['q'\].*4-bit base"):
            launch.plan_backend(c)

    bad = q.parent / "bad"
    bad.mkdir()
    (bad / "llmrec_base.json").write_text("{not json")
    with pytest.raises(ConfigError, match="llm.adapters.bad: .*unreadable"):
        launch.plan_backend(cfg(adapters={"bad": str(bad)}))

    c = cfg(adapters={"p": str(plain), "q": str(q)}, backend="transformers", adapter_mode="lora")
    plan = launch.plan_backend(c)
    backends, _, _ = launch.build_backends(c, plan)
    assert backends[None].base_weights["form"] == "dequantized"
    want = load_backend("transformers", model=tiny_dir, adapter=q, dtype="float32").score_choices(PROMPTS, CH)
    np.testing.assert_allclose(backends["q"].score_choices(PROMPTS, CH), want, atol=1e-5)
