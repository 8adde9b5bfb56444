"""llmrec.llm: the transformers backend and model loading, on tiny Llama models built from config (CPU, offline)."""

from __future__ import annotations

import importlib.util
import re

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
    assert np.isfinite(got).all()
    # each row is its prompt scored alone on its own list (the lists are not mixed up between rows)
    for i, (p, c) in enumerate(zip(PROMPTS, choices)):
        np.testing.assert_allclose(got[i], be.score_choices([p], [c])[0], atol=1e-5)
    # the same prompt with reversed choices gives the reversed scores
    rev = be.score_choices([PROMPTS[1]], [[" A", " B", " C"]])
    np.testing.assert_allclose(got[1][::-1], rev[0], atol=1e-5)
    with pytest.raises(ValueError, match="same"):
        be.score_choices(PROMPTS[:2], [[" A", " B"], [" A"]])


def test_choices_sharing_a_first_token_are_refused(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32")
    assert be.first_token_id(" Yes") == be.first_token_id(" Yesterday")  # the tiny tokenizer has no " Yesterday"
    with pytest.raises(BackendError, match=r"' Yes' and ' Yesterday' start with the same token"):
        be.score_choices(PROMPTS, [" Yes", " No", " Yesterday"])
    with pytest.raises(BackendError, match=r"' A' and ' A' start with the same token"):
        be.score_choices(PROMPTS[:2], [[" A", " B"], [" A", " A"]])


def _continuation_reference(be, prompt: str, cont: str) -> tuple[float, int]:
    """Sum of log P(token) over `cont`'s tokens: one unpadded forward over prompt + continuation, no cache."""
    p = be.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = be.tokenizer(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(be.model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
    return float(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(c))), len(c)


def test_score_continuations_equals_a_full_forward_per_continuation(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)  # 2 batches, padded prompts
    conts = [[' "Action Story"', ' "Comedy Story 2"', " Horror"], [" Yes", ' "Action Story 1"', " a b c d e"],
             [" Story", " Story", ' "Horror Story 4"']]
    sums, counts = be.score_continuations(PROMPTS, conts)
    assert sums.shape == counts.shape == (3, 3)
    for i, p in enumerate(PROMPTS):
        for j, c in enumerate(conts[i]):
            ref, n = _continuation_reference(be, p, c)
            assert counts[i, j] == n
            assert sums[i, j] == pytest.approx(ref, abs=1e-4)
    assert sums[2, 0] == sums[2, 1]  # the same continuation, the same score
    with pytest.raises(ValueError, match="same"):
        be.score_continuations(PROMPTS[:2], [[" A", " B"], [" A"]])
    with pytest.raises(BackendError, match="no tokens"):
        be.score_continuations(PROMPTS[:1], [[""]])


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


def test_stop_strings_match_the_generated_text_only(tiny_dir):
    """A stop string is looked for in the generated text (as vLLM / OpenAI do), never across the end of the prompt:
    e.g. stop "\\n\\n" after a prompt ending in "\\n" must not end decoding when the model writes its first "\\n"."""
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    full = be.generate(PROMPTS, max_new_tokens=8)
    stops = [p[-1] + t[0] for p, t in zip(PROMPTS, full)]  # the prompt's last char + the first generated one
    assert all(s not in t for s, t in zip(stops, full)), (stops, full)
    for p, s, t in zip(PROMPTS, stops, full):
        assert be.generate([p], max_new_tokens=8, stop=[s]) == [t]
        assert be.generate_quoted([p], [[]], max_new_tokens=8, stop=[s]) == [t]
    assert be.generate(PROMPTS, max_new_tokens=8, stop=stops[:1]) == full  # batched, rows of unequal lengths


def test_empty_prompt_lists(tiny_dir):
    """No prompts: empty results shaped like the non-empty ones ([0, n_choices] for one shared choice list, as the
    vLLM backend answers), and no model call."""
    be = load_backend("transformers", model=tiny_dir, dtype="float32")
    assert be.score_choices([], [" Yes", " No"]).shape == (0, 2)
    assert be.score_choices([], []).shape == (0, 0)
    assert be.generate([]) == [] and be.generate_quoted([], []) == [] and be.generate_from([], [], n=2) == []
    sums, counts = be.score_continuations([], [])
    assert sums.shape == counts.shape == (0, 0)


def test_max_new_tokens_below_one_is_refused(tiny_dir):
    """The same ValueError on every backend and whatever the prompts (none included), not transformers' own."""
    be = load_backend("transformers", model=tiny_dir, dtype="float32")
    for prompts in ([], PROMPTS[:1]):
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            be.generate(prompts, max_new_tokens=0)
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            be.generate_quoted(prompts, [["Action Story"]] * len(prompts), max_new_tokens=-1)


def test_missing_model_and_unknown_kind(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_backend("transformers", model=tmp_path / "nope")
    with pytest.raises(BackendError, match="config.json"):
        load_backend("transformers", model=tmp_path)
    with pytest.raises(BackendError, match="unknown backend kind"):
        load_backend("onnx", model=tmp_path)


def test_device_auto_places_the_model_and_cuda_without_a_gpu_is_a_clear_error(tiny_dir):
    import torch

    b = load_backend("transformers", model=tiny_dir, dtype="float32")  # device="auto"
    assert b.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA device"):
            load_backend("transformers", model=tiny_dir, dtype="float32", device="cuda")
    assert load_backend("transformers", model=tiny_dir, dtype="float32", device="cpu").device.type == "cpu"


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
    # a fixed adapter on a full-precision base is merged at load (no LoRA layers left), scoring as the separate one
    separate = load_backend("transformers", model=tiny_dir, adapter=tmp_path / "adapter", dtype="float32",
                            merge_adapter=False)
    assert with_adapter.adapter_merged and not separate.adapter_merged
    assert not any("lora_" in n for n, _ in with_adapter.model.named_parameters())
    assert any("lora_" in n for n, _ in separate.model.named_parameters())
    np.testing.assert_allclose(separate.score_choices(PROMPTS, [" Yes", " No"]), s_ad, atol=1e-5)
    assert separate.generate(PROMPTS[:2], max_new_tokens=4) == with_adapter.generate(PROMPTS[:2], max_new_tokens=4)
    with pytest.raises(BackendError, match="fixed adapter"):
        with_adapter.add_adapter("other", tmp_path / "adapter")
    q4 = load_backend("transformers", model=tiny_dir, adapter=tmp_path / "adapter", dtype="float32", load_in_4bit=True)
    assert not q4.adapter_merged and any("lora_" in n for n, _ in q4.model.named_parameters())  # no re-quantizing
    out = merge_and_save(tiny_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = load_backend("transformers", model=out, dtype="float32")
    np.testing.assert_allclose(merged.score_choices(PROMPTS, [" Yes", " No"]), s_ad, atol=1e-4)
    from llmrec.ranking.factory import adapter_templates

    assert adapter_templates(out) == {"yesno": "yesno_stats"}  # the merged model keeps its training prompt
    with pytest.raises(BackendError, match="adapter_config.json"):
        load_backend("transformers", model=tiny_dir, adapter=tmp_path)

    # the same adapter marked as fitted to an nf4 base (what a QLoRA run writes): scored and merged on that base's
    # dequantized weights, which reproduce the 4-bit model with the adapter far better than the original weights
    from llmrec.llm.loading import QuantSettings, write_adapter_base

    write_adapter_base(tmp_path / "adapter", QuantSettings(load_in_4bit=True))
    s_q4 = q4.score_choices(PROMPTS, [" Yes", " No"])
    s_deq = load_backend("transformers", model=tiny_dir, adapter=tmp_path / "adapter", dtype="float32",
                         ).score_choices(PROMPTS, [" Yes", " No"])
    assert np.abs(s_deq - s_q4).max() < 0.25 * np.abs(s_ad - s_q4).max()
    out_deq = merge_and_save(tiny_dir, tmp_path / "adapter", tmp_path / "merged_deq", dtype="float32")
    np.testing.assert_allclose(load_backend("transformers", model=out_deq, dtype="float32").score_choices(
        PROMPTS, [" Yes", " No"]), s_deq, atol=1e-4)


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


# ------------------------------------------------------------------------------------------------ constrained decoding
def test_option_trie_walk():
    from llmrec.llm.base import OptionTrie

    # options: 0 = [5, 6], 1 = [5, 7, 8], 2 = [9], 3 = [5, 6, 1] (option 0 is a prefix of option 3); end token 0
    trie = OptionTrie([[5, 6], [5, 7, 8], [9], [5, 6, 1]], n=3, eos_id=0)
    assert trie.walk([]) == ([], [5, 9])
    assert trie.walk([5]) == ([], [6, 7])
    assert trie.walk([5, 6]) == ([0], [5, 9])  # option 0 completes at its last token; the walk restarts at the root
    assert trie.walk([5, 6, 5, 6]) == ([0], [1])  # option 0 is taken: only the longer option 3 continues
    assert trie.walk([5, 6, 9]) == ([0, 2], [5])  # 0 and 2 taken: 1 and 3 are left, both start with 5
    assert trie.walk([5, 6, 9, 5, 7, 8]) == ([0, 2, 1], [0])  # n options written: only the end token
    assert trie.walk([5, 6, 9, 5, 7, 8, 0, 0]) == ([0, 2, 1], [0])  # end token and padding after it
    assert trie.walk([7]) == ([], [0])  # off the trie (cannot happen under the constraint): end
    assert trie.max_new_tokens() == 3 + 3 + 2 + 1
    everything = OptionTrie([[5, 6], [9]], n=5, eos_id=0)
    assert everything.n == 2 and everything.walk([9, 5, 6]) == ([1, 0], [0])
    with pytest.raises(ValueError, match="at least one token"):
        OptionTrie([[5], []], n=1, eos_id=0)


def test_constrained_greedy_skips_forced_tokens_and_matches_masked_decoding():
    from llmrec.llm.base import OptionTrie, constrained_greedy

    seqs = [[5, 6, 7, 1], [5, 6, 8, 1], [9, 3, 1], [5, 2, 1]]  # 1 = separator, 0 = end token

    def score(prefix: tuple[int, ...], tok: int) -> float:  # a fixed "model": any deterministic function
        return ((hash(prefix) % 97) * 31 + tok * 17) % 23

    def masked(n: int) -> list[int]:  # reference: a model call at every position, argmax over the allowed tokens
        trie, gen = OptionTrie(seqs, n, 0), []
        while True:
            _, ok = trie.walk(gen)
            if ok == [0]:
                return trie.walk(gen)[0]
            gen.append(max(ok, key=lambda t: score(tuple(gen), t)))

    calls = []

    def step(rows, allowed, gen):
        calls.append(len(rows))
        assert all(len(a) > 1 for a in allowed)  # only branching points reach the model
        return [max(a, key=lambda t, g=tuple(gen[r]): score(g, t)) for r, a in zip(rows, allowed)]

    for n in (1, 2, 4):
        got = constrained_greedy([OptionTrie(seqs, n, 0), OptionTrie(seqs[::-1], n, 0)], step)
        assert got[0] == masked(n) and len(got[0]) == n and len(set(got[0])) == n
        assert len(got[1]) == n
    calls.clear()
    constrained_greedy([OptionTrie(seqs, 4, 0)], step)  # writes all 14 tokens
    assert sum(calls) <= 6  # model calls only where options part: {5, 9}, {6, 2}, {7, 8}, then fewer as options go


def _greedy_constrained_reference(be, prompt: str, options: list[str], n: int, sep: str = "\n") -> list[int]:
    """One prompt, no padding, a full forward per step: argmax over the tokens that keep the text on an option not yet
    written. Independent of OptionTrie."""
    tok = be.tokenizer
    seqs = [tok.encode(o + sep, add_special_tokens=False) for o in options]
    ids = tok.encode(prompt, add_special_tokens=False)
    chosen: list[int] = []
    cur: list[int] = []  # tokens of the option being written
    while len(chosen) < min(n, len(options)):
        live = [j for j, s in enumerate(seqs) if j not in chosen and s[: len(cur)] == cur and len(s) > len(cur)]
        allowed = sorted({seqs[j][len(cur)] for j in live})
        with torch.no_grad():
            logits = be.model(torch.tensor([ids])).logits[0, -1]
        t = max(allowed, key=lambda a: float(logits[a]))
        ids.append(t)
        cur.append(t)
        done = [j for j in live if seqs[j] == cur]
        if done:
            chosen.append(done[0])
            cur = []
    return chosen


def test_generate_from_equals_greedy_constrained_reference(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    options = [[" Action Story", " Comedy Story", " Drama Story", " Horror Story", " A", " B"],
               [" Yes", " No", " Horror Comedy"],
               [" liked movie", " rated movie", " gift card", " next title", " history"]]
    got = be.generate_from(PROMPTS, options, n=4)  # batches of 2: left padding in the first batch
    assert [len(g) for g in got] == [4, 3, 4]  # the second prompt has only 3 options
    for p, opts, g in zip(PROMPTS, options, got):
        assert len(set(g)) == len(g)
        assert g == _greedy_constrained_reference(be, p, opts, n=4)
    assert be.generate_from(PROMPTS[:1], [options[0]], n=0) == [[]]
    with pytest.raises(ValueError, match="option lists"):
        be.generate_from(PROMPTS, options[:2], n=2)


def test_quoted_state_and_span_processor():
    from llmrec.llm.base import OptionTrie, quoted_state
    from llmrec.llm.transformers_backend import quoted_span_processor

    # vocabulary: 1 = ' "' (opens), 2 = ')"' (closes, a quote-character token), 3 = '""' (quote token, never allowed),
    # 5..9 = text; options (text + closing quote): 0 = [5, 6, 2], 1 = [5, 7, 2], 2 = [8, 2]
    trie = OptionTrie([[5, 6, 2], [5, 7, 2], [8, 2]], 3, eos_id=0)
    opens = {1}
    assert quoted_state(trie, [9, 9], opens) == (None, set())  # free text
    assert quoted_state(trie, [9, 1], opens) == ([5, 8], set())  # a quote opened: an option must follow
    assert quoted_state(trie, [1, 5], opens) == ([6, 7], set())
    assert quoted_state(trie, [1, 5, 6, 2, 9], opens) == (None, {0})  # option 0 closed its quote
    assert quoted_state(trie, [1, 5, 6, 2, 1, 5], opens) == ([7], {0})  # used options are not offered again
    proc = quoted_span_processor([trie, None], start=2, quote_ids=[1, 2, 3], open_ids=[1])
    ids = torch.tensor([[4, 4, 1, 5, 6, 2, 1, 5], [4, 4, 9, 9, 9, 9, 9, 9]])
    out = proc(ids, torch.zeros(2, 10))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [7]  # inside the second quote: only option 1 left
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 4, 5, 6, 7, 8, 9]  # no quotes at all
    out = proc(torch.tensor([[4, 4, 9], [4, 4, 9]]), torch.zeros(2, 10))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7, 8, 9]  # may open, not 2 or 3
    lead = quoted_span_processor([trie, None], start=2, quote_ids=[1, 2, 3], open_ids=[1], lead_quote=True)
    out = lead(torch.tensor([[4, 4], [4, 4]]), torch.zeros(2, 10))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1]  # must open a quote first
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 4, 5, 6, 7, 8, 9]  # nothing to quote: free
    out = lead(torch.tensor([[4, 4, 1], [4, 4, 9]]), torch.zeros(2, 10))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [5, 8]  # then as without lead_quote
    used_all = torch.tensor([[4, 4, 1, 5, 6, 2, 1, 5, 7, 2, 1, 8, 2, 9]])
    out = quoted_span_processor([trie], 2, [1, 2, 3], [1])(used_all, torch.zeros(1, 10))
    assert 1 not in torch.isfinite(out[0]).nonzero().flatten().tolist()  # every option used: no new quote


def test_frequency_penalty_processor_counts_generated_tokens_only():
    from llmrec.llm.transformers_backend import frequency_penalty_processor

    # prompt = columns 0..2 (token 5 there is not counted); generated: 5, 5, 7 -> token 5 twice, token 7 once
    ids = torch.tensor([[5, 5, 3, 5, 5, 7], [0, 0, 0, 9, 1, 1]])
    scores = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    out = frequency_penalty_processor(start=3, penalty=0.5)(ids, scores.clone())
    want = scores.clone()
    want[0, 5] -= 1.0
    want[0, 7] -= 0.5
    want[1, 9] -= 0.5
    want[1, 1] -= 1.0
    torch.testing.assert_close(out, want)
    same = frequency_penalty_processor(start=6, penalty=0.5)(ids, scores.clone())  # nothing generated yet
    torch.testing.assert_close(same, scores)


def _greedy_with_penalty(be, prompt, n, penalty):
    """Reference: token-by-token greedy decoding without generate(), logits minus penalty x generated counts."""
    ids = be.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0].tolist()
    gen: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = be.model(input_ids=torch.tensor([ids + gen])).logits[0, -1].clone()
        for t in set(gen):
            logits[t] -= penalty * gen.count(t)
        nxt = int(logits.argmax())
        gen.append(nxt)
        if nxt == be.tokenizer.eos_token_id:
            break
    return be.tokenizer.decode(gen, skip_special_tokens=True)


def test_generate_frequency_penalty_matches_reference_and_changes_output(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    plain = be.generate(PROMPTS, max_new_tokens=12)
    pen = be.generate(PROMPTS, max_new_tokens=12, frequency_penalty=3.0)  # batches of 2: left padding counts not
    for p, got in zip(PROMPTS, pen):
        assert got == _greedy_with_penalty(be, p, 12, 3.0)
    assert be.generate(PROMPTS, max_new_tokens=12, frequency_penalty=0.0) == plain
    # the tiny random model repeats itself when greedy; the penalty makes it stop
    assert pen != plain
    q = be.generate_quoted(PROMPTS[:1], [[]], max_new_tokens=12, frequency_penalty=3.0)
    assert '"' not in q[0]


def test_generate_quoted_only_writes_allowed_quotes(tiny_dir):
    from llmrec.llm.base import quote_token_sets

    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    quote_ids, open_ids = quote_token_sets(be.tokenizer)
    assert open_ids and set(open_ids) <= set(quote_ids)
    assert all('"' in be.tokenizer.decode([i]) for i in quote_ids)
    quotable = [["Action Story", "Comedy Story"], [], ["Drama Story"]]
    # make the model want to open a quote at every step: the constraint alone decides what follows
    bias = torch.zeros(be.model.config.vocab_size)
    bias[open_ids] = 50.0
    hook = be.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        outs = be.generate_quoted(PROMPTS, quotable, max_new_tokens=24)
    finally:
        hook.remove()
    assert len(outs) == 3
    for text, allowed in zip(outs, quotable):
        spans = text.split('"')[1::2]
        assert sorted(spans) == sorted(allowed), (text, allowed)  # each allowed title quoted once, nothing else
    assert '"' not in outs[1]
    # lead_quote: the text opens with a quoted title even where the model would rather not quote at all
    bias[open_ids] = -50.0
    hook = be.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        free = be.generate_quoted(PROMPTS, quotable, max_new_tokens=24)
        led = be.generate_quoted(PROMPTS, quotable, max_new_tokens=24, lead_quote=True)
    finally:
        hook.remove()
    assert all('"' not in t for t in free)
    for text, allowed in zip(led, quotable):
        if allowed:
            m = re.match(r' ?"([^"]*)"', text)
            assert m and m.group(1) in allowed, (text, allowed)
        else:
            assert '"' not in text


def test_bitsandbytes_hub_kernel_hint_is_replaced_by_one_accurate_line(caplog, monkeypatch):
    # bitsandbytes' "pip install kernels" hint would have users fetch a kernel from a hub at run time; the library
    # drops it and says once that bitsandbytes' built-in CPU kernels run. Other bitsandbytes warnings pass through.
    import logging

    import llmrec.llm.loading as loading

    monkeypatch.setattr(loading._HubKernelHint, "said", False)
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    msg = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure "
           "you already `pip install kernels` and the kernels >= 0.11.1")
    with caplog.at_level(logging.INFO):
        bnb_log.warning(msg)
        bnb_log.warning(msg)
        bnb_log.warning("some other bitsandbytes warning")
    texts = [r.getMessage() for r in caplog.records]
    assert not any("pip install kernels" in t for t in texts)
    assert sum("built-in kernels" in t for t in texts) == 1
    assert "some other bitsandbytes warning" in texts


def test_choice_logits_in_float32_from_the_head_input(tiny_dir):
    """In bf16, choice logits come from a float32 product of the final hidden state and the head's rows (finer than
    the model's bf16 logits, which tie), and stay within bf16 rounding of the model's own logits. One prompt per
    batch: the reference below is the unpadded forward (in bf16, left padding moves the hidden state a little)."""
    be = load_backend("transformers", model=tiny_dir, dtype="bfloat16", batch_size=1)
    ids = torch.tensor([[be.first_token_id(" Yes"), be.first_token_id(" No")]] * len(PROMPTS))
    got = be.choice_logits(PROMPTS, ids)
    coarse = torch.gather(be.next_token_logits(PROMPTS), 1, ids)
    for i, p in enumerate(PROMPTS):
        enc = be.tokenizer(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            h = be.model.model(**enc).last_hidden_state[0, -1].float()
            ref = be.model.lm_head.weight[ids[i]].float() @ h
        np.testing.assert_allclose(got[i].numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), coarse.numpy(), rtol=0.02, atol=0.05)
    # the model's own logits are bf16 values; the float32 ones in general are not
    assert torch.equal(coarse, coarse.bfloat16().float())
    assert not torch.equal(got, got.bfloat16().float())
    lp = be.score_choices(PROMPTS, [" Yes", " No"])
    np.testing.assert_allclose(lp, torch.log_softmax(got, -1).numpy(), atol=1e-6)


def test_choice_logits_fall_back_to_the_models_own_under_a_logit_transform(tiny_dir):
    be = load_backend("transformers", model=tiny_dir, dtype="bfloat16", batch_size=2)
    be.model.config.final_logit_softcapping = 30.0  # a transform the float32 head would not apply
    ids = torch.tensor([[be.first_token_id(" Yes"), be.first_token_id(" No")]] * len(PROMPTS))
    got = be.choice_logits(PROMPTS, ids)
    assert torch.equal(got, torch.gather(be.next_token_logits(PROMPTS), 1, ids))


def test_choice_logits_fall_back_when_the_model_changes_its_logits_unannounced(tiny_dir, caplog):
    """A transform no config key names (here the head's output doubled by a hook) is caught by the per-batch check:
    the model's own logits are used, and a warning says so."""
    be = load_backend("transformers", model=tiny_dir, dtype="bfloat16", batch_size=2)
    h = be.model.lm_head.register_forward_hook(lambda _m, _i, out: out * 2)
    try:
        ids = torch.tensor([[be.first_token_id(" Yes"), be.first_token_id(" No")]] * len(PROMPTS))
        with caplog.at_level("WARNING", logger="llmrec.llm.transformers_backend"):
            got = be.choice_logits(PROMPTS, ids)
        assert torch.equal(got, torch.gather(be.next_token_logits(PROMPTS), 1, ids))
        assert any("disagrees" in r.getMessage() for r in caplog.records)
    finally:
        h.remove()


def test_qlora_merge_requantizes_the_base_from_the_dtype_it_was_trained_on(tiny_dir, tmp_path):
    """The nf4 codes of a base depend on the weights quantized: an fp32 checkpoint read in bf16 first rounds them,
    and some codes land a whole nf4 step away. An adapter trained on the 4-bit base read in fp32 is merged (here
    written in bf16, `llmrec export`'s default) on the dequantized weights of THAT base: the merged weights are the
    training base + the LoRA delta up to bf16 rounding, not up to an nf4 step."""
    from llmrec.bench_utils import random_lora_adapter
    from llmrec.llm.loading import load_dequantized_4bit, merge_and_save, write_adapter_base

    pytest.importorskip("bitsandbytes")
    q = QuantSettings(load_in_4bit=True, compute_dtype="float32")
    random_lora_adapter(tiny_dir, tmp_path / "adapter", r=4, target_modules=["q_proj"], std=0.5)
    write_adapter_base(tmp_path / "adapter", q, source_dtype="float32")
    trained_on, _ = load_dequantized_4bit(tiny_dir, q, dtype="float32")
    from peft import PeftModel

    ref = PeftModel.from_pretrained(trained_on, str(tmp_path / "adapter")).merge_and_unload()
    out = merge_and_save(tiny_dir, tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16")
    got, _ = load_causal_lm(out, dtype="float32")
    refs = dict(ref.named_parameters())
    checked = 0
    for name, w in got.named_parameters():
        if name.endswith("proj.weight"):
            r = refs[name]
            checked += 1
            err = (w.detach() - r.detach()).abs().max() / r.detach().abs().max()
            assert err < 0.01, (name, float(err))  # bf16: 2^-8 relative; one nf4 step is ~10% of the range
    assert checked >= 2 * 7, checked  # every projection of the tiny model's 2 layers


def test_backend_serves_a_qlora_adapter_on_the_base_quantized_from_its_recorded_dtype(tiny_dir, tmp_path):
    """The transformers backend, as `llmrec export --merge`, re-quantizes an adapter's base from the dtype the
    adapter records (`llmrec_base.json`), whatever dtype it computes in: its weights outside the LoRA targets are
    exactly those of that base, not of the checkpoint read in the serving dtype first."""
    from llmrec.bench_utils import random_lora_adapter
    from llmrec.llm.loading import load_dequantized_4bit, write_adapter_base

    pytest.importorskip("bitsandbytes")
    q = QuantSettings(load_in_4bit=True, compute_dtype="float32")
    random_lora_adapter(tiny_dir, tmp_path / "adapter", r=4, target_modules=["q_proj"], std=0.5)
    write_adapter_base(tmp_path / "adapter", q, source_dtype="float32")
    be = load_backend("transformers", model=tiny_dir, adapter=tmp_path / "adapter", dtype="bfloat16")
    want, _ = load_dequantized_4bit(tiny_dir, q, dtype="bfloat16", source_dtype="float32")
    other, _ = load_dequantized_4bit(tiny_dir, q, dtype="bfloat16", source_dtype="bfloat16")
    got = {n.split("base_model.model.")[-1]: p for n, p in be.model.named_parameters()}
    differs = 0
    for name, w in want.named_parameters():
        if name.endswith(("k_proj.weight", "down_proj.weight")):
            assert torch.equal(got[name].detach(), w.detach()), name
            differs += not torch.equal(w.detach(), dict(other.named_parameters())[name].detach())
    assert differs  # the two bases differ here, so the check above tells them apart


def test_every_backend_call_gives_the_models_training_mode_back(tiny_dir):
    """The trainer's evaluation scores the model it is training: scoring, continuation log-probs and generation put
    it in eval mode for the call and give its training mode back."""
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    calls = [lambda: be.score_choices(PROMPTS, [" Yes", " No"]),
             lambda: be.score_continuations(PROMPTS[:2], [" Action Story", " Comedy Story"]),
             lambda: be.generate(PROMPTS[:2], max_new_tokens=2)]
    for call in calls:
        be.model.train()
        call()
        assert be.model.training
        be.model.eval()
        call()
        assert not be.model.training
