"""llmrec.llm: the transformers backend and model loading, on tiny Llama models built from config (CPU, offline)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.llm import BackendError, LoraSettings, QuantSettings, apply_lora, load_backend, load_causal_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


PROMPTS = [
    "The user watched Action Story 1 and Comedy Story 2. Will the user like Horror Story 4? Answer:",
    "Candidates: A. Action Story B. Comedy Story. Answer:",
    "liked movie Answer:",
]


def test_score_choices_is_a_log_softmax_over_first_token_logits(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    assert be.tokenizer.padding_side == "left"
    got = be.score_choices(PROMPTS, [" Yes", " No"])
    assert got.shape == (3, 2)
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-6)
    # reference: one prompt at a time, no padding, full logits at the last position
    for i, p in enumerate(PROMPTS):
        ids = be.tokenizer(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            last = be.model(**ids).logits[0, -1]
        sel = last[[be.tokenizer.encode(" Yes")[0], be.tokenizer.encode(" No")[0]]]
        np.testing.assert_allclose(got[i], torch.log_softmax(sel, -1).numpy(), atol=1e-4)


def test_score_choices_per_prompt_lists(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=8)
    choices = [[" A", " B", " C"], [" C", " B", " A"], [" A", " B", " C"]]
    got = be.score_choices(PROMPTS, choices)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got[1], got[1])  # finite
    # the same prompt with reversed choices gives the reversed scores
    rev = be.score_choices([PROMPTS[1]], [[" A", " B", " C"]])
    np.testing.assert_allclose(got[1][::-1], rev[0], atol=1e-5)
    with pytest.raises(ValueError, match="same"):
        be.score_choices(PROMPTS[:2], [[" A", " B"], [" A"]])


def test_generate_greedy_and_stop(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    a = be.generate(PROMPTS, max_new_tokens=6)
    b = be.generate(PROMPTS, max_new_tokens=6)
    assert a == b and all(isinstance(x, str) for x in a)
    first = a[0][:2]
    if first.strip():
        cut = be.generate(PROMPTS[:1], max_new_tokens=6, stop=[first])
        assert cut == [""]
    # a stop string inside the text: decoding ends there, the text before it is the same greedy continuation
    text = a[0]
    mid = next((i for i in range(1, len(text) - 1) if text[i : i + 2].strip()), None)
    assert mid is not None, text
    stop = text[mid : mid + 2]
    assert be.generate(PROMPTS[:1], max_new_tokens=6, stop=[stop]) == [text[: text.index(stop)]]


def test_missing_model_and_unknown_kind(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_backend("transformers", model=tmp_path / "nope")
    with pytest.raises(BackendError, match="config.json"):
        load_backend("transformers", model=tmp_path)
    with pytest.raises(BackendError, match="unknown backend kind"):
        load_backend("onnx", model=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_is_a_clear_error(tiny_dir):
    with pytest.raises(BackendError, match="vllm"):
        load_backend("vllm", model=tiny_dir)


def test_4bit_refuses_layer_shapes_it_cannot_take(tmp_path):
    bad = make_tiny_llm(tmp_path / "bad", hidden=48, intermediate=96, heads=2, kv_heads=2)
    with pytest.raises(BackendError, match=r"multiples of 32.*q_proj \(48->48\)"):
        load_causal_lm(bad, dtype="float32", quant=QuantSettings(load_in_4bit=True, compute_dtype="float32"))


def test_4bit_forward_before_lora_is_refused(tiny_dir):
    m, tok = load_causal_lm(tiny_dir, dtype="float32", quant=QuantSettings(load_in_4bit=True, compute_dtype="float32"))
    with torch.no_grad():
        m(input_ids=torch.tensor([tok.encode("liked movie")]))
    with pytest.raises(BackendError, match="before prepare_model_for_kbit_training"):
        apply_lora(m, LoraSettings(r=4, target_modules=["q_proj"]))


def test_unknown_lora_target_module(tiny_dir):
    m, _ = load_causal_lm(tiny_dir, dtype="float32")
    with pytest.raises(BackendError, match="query_key_value"):
        apply_lora(m, LoraSettings(r=4, target_modules=["query_key_value"]))


def test_adapter_roundtrip_and_merge(tiny_dir, tmp_path):
    from llmrec.bench_utils import random_lora_adapter
    from llmrec.llm import merge_and_save

    random_lora_adapter(tiny_dir, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"], std=0.5)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    (tmp_path / "adapter" / "llmrec_prompt.json").write_text('{"task": "yesno", "template": "yesno_stats"}')
    with_adapter = load_backend("transformers", model=tiny_dir, adapter=tmp_path / "adapter", dtype="float32")
    base = load_backend("transformers", model=tiny_dir, dtype="float32")
    s_ad = with_adapter.score_choices(PROMPTS, [" Yes", " No"])
    assert not np.allclose(s_ad, base.score_choices(PROMPTS, [" Yes", " No"]), atol=1e-4)
    out = merge_and_save(tiny_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = load_backend("transformers", model=out, dtype="float32")
    np.testing.assert_allclose(merged.score_choices(PROMPTS, [" Yes", " No"]), s_ad, atol=1e-4)
    from llmrec.ranking.factory import adapter_templates

    assert adapter_templates(out) == {"yesno": "yesno_stats"}  # the merged model keeps its training prompt
    with pytest.raises(BackendError, match="adapter_config.json"):
        load_backend("transformers", model=tiny_dir, adapter=tmp_path)


def test_several_adapters_share_one_base_model(tiny_dir, tmp_path):
    """add_adapter loads each adapter into the one model; a view per adapter scores exactly like a backend built
    with that adapter alone, the base view like the plain model, in any call order and from several threads."""
    import threading

    from llmrec.bench_utils import random_lora_adapter

    a1 = random_lora_adapter(tiny_dir, tmp_path / "a1", 1, r=4, target_modules=["q_proj", "v_proj"], std=0.5)
    a2 = random_lora_adapter(tiny_dir, tmp_path / "a2", 2, r=4, target_modules=["o_proj", "up_proj"], std=0.5)
    ch = [" Yes", " No"]
    ref = {None: load_backend("transformers", model=tiny_dir, dtype="float32").score_choices(PROMPTS, ch)}
    for name, path in (("a1", a1), ("a2", a2)):
        ref[name] = load_backend("transformers", model=tiny_dir, adapter=path, dtype="float32").score_choices(
            PROMPTS, ch)
    assert not np.allclose(ref["a1"], ref[None], atol=1e-4) and not np.allclose(ref["a1"], ref["a2"], atol=1e-4)

    base = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    before = base.with_adapter(None)  # a view taken before any adapter was loaded stays the base model
    views = {None: base, "a1": base.add_adapter("a1", a1), "a2": base.add_adapter("a2", a2)}
    assert views["a1"].model is base.model and views["a1"].name.endswith("+a1")
    for name in ("a2", None, "a1", "a1", None, "a2"):
        np.testing.assert_allclose(views[name].score_choices(PROMPTS, ch), ref[name], atol=1e-5)
    np.testing.assert_allclose(before.score_choices(PROMPTS, ch), ref[None], atol=1e-5)
    gen = {n: v.generate(PROMPTS[:2], max_new_tokens=4) for n, v in views.items()}
    assert gen["a1"] == load_backend("transformers", model=tiny_dir, adapter=a1, dtype="float32",
                                     batch_size=2).generate(PROMPTS[:2], max_new_tokens=4)

    errors = []

    def hammer(name):
        try:
            for _ in range(5):
                np.testing.assert_allclose(views[name].score_choices(PROMPTS, ch), ref[name], atol=1e-5)
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append((name, e))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (None, "a1", "a2", "a1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with pytest.raises(BackendError, match="unknown adapter 'a3'"):
        base.with_adapter("a3")
    with pytest.raises(BackendError, match="already loaded"):
        base.add_adapter("a1", a1)
    with pytest.raises(BackendError, match="adapter_config.json"):
        base.add_adapter("a3", tmp_path)
