"""After a 4-bit load no weight may still be a view of the mapped .safetensors file: such views keep every page of
the checkpoint that loading read resident (2 GB for a 1.1B bf16 model) although only the quantized copies are used."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from llm_fixtures import make_tiny_llm

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")


def mapped(path: Path) -> bool:
    gc.collect()
    target = str(path.resolve())
    return any(line.rstrip().endswith(target) for line in Path("/proc/self/maps").read_text().splitlines())


def bf16_checkpoint(root: Path, tied: bool) -> Path:
    """A tiny Llama saved in bf16 (a bf16 load is then views of the file, as with real bf16 checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = make_tiny_llm(root / "src")
    out = root / "bf16"
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    m.to(torch.bfloat16).save_pretrained(out)
    for f in src.glob("*token*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def bf16_dir(request, tmp_path_factory):
    return bf16_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param), request.param


def test_a_4bit_load_drops_the_checkpoint_mapping_and_keeps_the_weights(bf16_dir):
    import torch
    from safetensors.torch import load_file

    from llmrec.llm.loading import QuantSettings, load_causal_lm, release_checkpoint_mmap

    path, tied = bf16_dir
    ckpt = path / "model.safetensors"
    # control: a plain bf16 load is all views of the mapping (by design: those pages ARE its weights), so the check
    # below can see a mapping when there is one
    plain, _ = load_causal_lm(path, dtype="bfloat16")
    assert mapped(ckpt)
    assert release_checkpoint_mmap(plain) > 0
    assert not mapped(ckpt)
    del plain

    model, _ = load_causal_lm(path, dtype="bfloat16",
                              quant=QuantSettings(load_in_4bit=True, compute_dtype="bfloat16"))
    assert not mapped(ckpt)
    ref = load_file(str(ckpt))
    emb = model.model.embed_tokens.weight
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, ref["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"])
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    if tied:
        assert model.lm_head.weight is emb
    assert release_checkpoint_mmap(model) == 0  # nothing mapped is left to copy


def test_load_memory_benchmark_runs_each_configuration_in_its_own_process(tmp_path):
    """eval/load_memory.py on a tiny bf16 checkpoint: the chosen load configurations and the adapter pair (one
    model per adapter vs all in one), each in its own process, with the memory fields and ratios written."""
    import json
    import os
    import subprocess
    import sys

    path = bf16_checkpoint(tmp_path, tied=False)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LLMREC_RESULTS": str(tmp_path / "results")}
    r = subprocess.run([sys.executable, str(root / "eval" / "load_memory.py"), "--model", str(path), "--label", "_t",
                        "--only", "4bit", "4bit_prequantized", "--adapters", "1"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results" / "load_memory_t.json").read_text())
    runs = {x["kind"]: x for x in res["runs"]}
    assert set(runs) == {"4bit", "4bit_prequantized", "adapters_separate", "adapters_shared"}
    assert all(x["score_finite"] for x in runs.values()) and runs["adapters_shared"]["adapters"] == 1
    for x in runs.values():
        assert x["RssAnon"] + x["RssFile"] <= x["VmRSS"] + 1.0 and x["VmRSS"] <= x["VmHWM"] + 1.0
    assert "rss_adapters_shared_over_separate" in res
    assert "| adapters_shared |" in (tmp_path / "results" / "load_memory_t.md").read_text()


def mapping_rss_kb(ptr: int) -> int:
    """Resident kB of the mapping that contains address `ptr` (Linux smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= ptr < hi
        elif inside and head[0] == "Rss:":
            return int(head[1])
    raise AssertionError("no mapping holds that address")


def test_the_release_leaves_other_models_mappings_alone(bf16_dir):
    """A bf16 model loaded earlier in the process keeps its mapping and its resident pages when a 4-bit model of
    the same file is loaded (and released) after it."""
    import torch

    from llmrec.llm.loading import QuantSettings, load_causal_lm

    path, _ = bf16_dir
    plain, tok = load_causal_lm(path, dtype="bfloat16")
    with torch.no_grad():
        plain(**tok("liked movie", return_tensors="pt"))  # touch its pages
    ptr = plain.model.embed_tokens.weight.untyped_storage().data_ptr()
    before = mapping_rss_kb(ptr)
    q4, _ = load_causal_lm(path, dtype="bfloat16", quant=QuantSettings(load_in_4bit=True, compute_dtype="bfloat16"))
    gc.collect()
    target = str((path / "model.safetensors").resolve())
    assert sum(line.endswith(target) for line in Path("/proc/self/maps").read_text().splitlines()) == 1
    assert before > 0 and mapping_rss_kb(ptr) == before


def test_the_release_drops_each_copied_tensors_pages_as_it_goes(bf16_dir, monkeypatch):
    """A model that is all views of its file (a bf16 load here; a copy saved 4-bit likewise) is copied tensor by
    tensor; the pages each copy read leave the RSS right after it, so the file's pages and their copies are never
    resident together (a saved 4-bit 3B model peaked at 4.4 GB while loading, twice its 2 GB, before this)."""
    import llmrec.llm.loading as L

    path, _ = bf16_dir
    plain, _ = L.load_causal_lm(path, dtype="bfloat16")
    spans = {}
    for p in plain.parameters():
        lo = p.untyped_storage().data_ptr() + p.storage_offset() * p.element_size()
        spans[id(p)] = (lo, lo + p.numel() * p.element_size())
    dropped: list[tuple[int, int]] = []
    real = L._drop_resident_pages
    monkeypatch.setattr(L, "_drop_resident_pages", lambda r: (dropped.extend((a, b) for a, b, _ in r), real(r)))
    assert L.release_checkpoint_mmap(plain) > 0
    assert len(dropped) > len(spans) // 2  # the mapping once up front, then each copied tensor's own span
    for lo, hi in spans.values():
        assert any(a <= lo and hi <= b and b - a < 2 * (hi - lo) + 8192 for a, b in dropped[1:]), (lo, hi)


def test_a_4bit_load_reads_the_checkpoint_with_pread_and_gets_the_same_model(bf16_dir, monkeypatch):
    """4-bit loads open the .safetensors with safetensors' pread backend (no mapping whose pages pile up while
    quantizing); a bf16 load keeps the mapping (zero copy); both 4-bit reads give the same weights and logits."""
    import torch
    import transformers.modeling_utils as mu

    from llmrec.llm.loading import QuantSettings, load_causal_lm

    path, _ = bf16_dir
    backends: list[str] = []
    real = mu.safe_open
    monkeypatch.setattr(mu, "safe_open", lambda *a, **k: (backends.append(k.get("backend")), real(*a, **k))[1])
    q = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16")
    a, tok = load_causal_lm(path, dtype="bfloat16", quant=q)
    assert backends and set(backends) == {"pread"}
    backends.clear()
    b, _ = load_causal_lm(path, dtype="bfloat16", quant=q, pread_4bit=False)
    assert backends and "pread" not in backends
    backends.clear()
    load_causal_lm(path, dtype="bfloat16")
    assert backends and "pread" not in backends
    assert mu.safe_open.__name__ == "<lambda>"  # the loader put back what it found
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    enc = tok("liked movie", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**enc).logits, b(**enc).logits)


def test_concurrent_4bit_loads_put_transformers_reader_back(bf16_dir):
    """Loads in several threads (a service building its backends) each patch transformers' safetensors reader for
    the load, and transformers sets torch's process-wide default dtype while it builds a model: whatever the
    interleaving, the original reader and default dtype are what is left."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import transformers.modeling_utils as mu

    from llmrec.llm.loading import QuantSettings, load_causal_lm

    path, _ = bf16_dir
    original = mu.safe_open
    q = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16")
    with ThreadPoolExecutor(3) as pool:
        models = list(pool.map(lambda _: load_causal_lm(path, dtype="bfloat16", quant=q)[0], range(3)))
    assert len(models) == 3 and mu.safe_open is original
    assert torch.get_default_dtype() == torch.float32


def test_a_safetensors_without_the_backend_argument_keeps_its_mapped_read(bf16_dir, monkeypatch):
    """An older safetensors whose safe_open takes no `backend`: the 4-bit load is left to transformers' own read."""
    import transformers.modeling_utils as mu

    import llmrec.llm.loading as L

    path, _ = bf16_dir
    real = mu.safe_open
    backends: list[object] = []
    monkeypatch.setattr(mu, "safe_open", lambda *a, **k: (backends.append(k.get("backend")), real(*a, **k))[1])
    monkeypatch.setattr(L, "_safetensors_has_pread", lambda: False)
    model, _ = L.load_causal_lm(path, dtype="bfloat16", quant=L.QuantSettings(load_in_4bit=True,
                                                                              compute_dtype="bfloat16"))
    assert backends and "pread" not in backends
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
