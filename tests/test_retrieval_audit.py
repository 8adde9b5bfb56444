"""Audit of retrieval (text scoring, embedding cache, cold start / unknown items / large k / ties) and of the
contamination probe. A fake encoder keeps these tests free of the sentence-transformer model."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from llmrec.retrieval.encoder import EmbeddingCache, text_hash

pytest.importorskip("faiss")


class FakeEncoder:
    """Deterministic unit vectors per text (sha256-seeded), the interface TextRetriever uses."""

    key = "fake-encoder"

    def __init__(self, dim: int = 8, same: bool = False):
        self.dim, self.same = dim, same
        self.last_stats: dict[str, float] = {}

    def encode_uncached(self, texts, progress=False):
        out = []
        for t in texts:
            seed = 0 if self.same else int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).normal(size=self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)

    def encode(self, texts, progress=False):
        self.last_stats = {"n": len(texts), "encoded": len(texts), "seconds": 0.0}
        return self.encode_uncached(list(texts))


def _retriever(ds, tmp_path, **kw):
    from llmrec.retrieval import TextRetriever

    enc = FakeEncoder(same=kw.pop("same", False))
    return TextRetriever(encoder=enc, cache_dir=tmp_path, **kw).build(ds, progress=False)


# ------------------------------------------------------------------------------------------------ embedding cache
def test_embedding_cache_interleaved_writers_never_pair_wrong_vectors(tmp_path, monkeypatch):
    """Two processes writing the same cache folder: whatever interleaving, a later reader must never get one text's
    vector under another text's hash (hashes and vectors were two files replaced one after the other, so writer A's
    hashes could land on writer B's vectors of the same length: a silently wrong, stale cache)."""
    a, b = EmbeddingCache(tmp_path, "m"), EmbeddingCache(tmp_path, "m")
    ta, tb = ["alpha", "beta"], ["gamma", "delta"]
    va = np.eye(4, dtype=np.float32)[:2]
    vb = np.eye(4, dtype=np.float32)[2:]
    real_replace = os.replace
    state = {"fired": False}

    def replace(src, dst):
        real_replace(src, dst)
        if not state["fired"]:  # right after A's first file lands, B writes its whole cache
            state["fired"] = True
            b.put([text_hash(t) for t in tb], vb)

    monkeypatch.setattr(os, "replace", replace)
    a.put([text_hash(t) for t in ta], va)
    monkeypatch.setattr(os, "replace", real_replace)
    fresh = EmbeddingCache(tmp_path, "m")
    truth = {text_hash(t): v for t, v in zip(ta + tb, list(va) + list(vb))}
    got = fresh.get(list(truth))
    assert any(g is not None for g in got)
    for v, g in zip(truth.values(), got):
        assert g is None or np.array_equal(g, v), "a cached vector is paired with another text's hash"


def test_cache_and_index_writers_of_one_process_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Temporary files were named by the process id alone: two writers of one process (threads of the service, a
    re-entrant build) wrote into the same `.cache.npz.<pid>.tmp`, so one writer's rename carried the other's half
    file and the second rename raised FileNotFoundError; a failed write also left its temporary file behind."""
    from llmrec.retrieval.index import build_index, load_index, save_index

    a, b = EmbeddingCache(tmp_path, "m"), EmbeddingCache(tmp_path, "m")
    real_savez = np.savez
    state = {"nested": False}

    def savez(f, **arrays):
        if not state["nested"]:  # writer B runs its whole write while A is half-way through its file
            state["nested"] = True
            f.write(b"PK\x03\x04half")
            b.put([text_hash("b")], np.eye(2, dtype=np.float32)[1:])
            f.seek(0)
            f.truncate()
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    a.put([text_hash("a")], np.eye(2, dtype=np.float32)[:1])
    monkeypatch.setattr(np, "savez", real_savez)
    got = EmbeddingCache(tmp_path, "m").get([text_hash("a"), text_hash("b")])
    assert np.array_equal(got[0], [1, 0]) and (got[1] is None or np.array_equal(got[1], [0, 1]))
    assert not list((tmp_path / "m").glob(".*"))  # no temporary file left

    def full(f, **arrays):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError, match="No space"):
        EmbeddingCache(tmp_path, "m").put([text_hash("c")], np.eye(2, dtype=np.float32)[:1])
    monkeypatch.setattr(np, "savez", real_savez)
    assert not list((tmp_path / "m").glob(".*")) and np.array_equal(
        EmbeddingCache(tmp_path, "m").get([text_hash("a")])[0], [1, 0])  # the old cache is intact
    # the index: a failed write leaves the folder as it was, without a temporary file
    import faiss

    meta = {"texts_sha": "a", "n_items": 4, "kind": "flat"}
    save_index(build_index(np.eye(4, dtype=np.float32)), tmp_path / "ix", meta)
    real_write = faiss.write_index

    def broken(index, path):
        real_write(index, path)
        raise RuntimeError("write failed")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(RuntimeError, match="write failed"):
        save_index(build_index(np.eye(4, dtype=np.float32)), tmp_path / "ix", {**meta, "texts_sha": "b"})
    monkeypatch.setattr(faiss, "write_index", real_write)
    assert not list((tmp_path / "ix").glob(".*")) and load_index(tmp_path / "ix", meta).ntotal == 4


def test_embedding_cache_round_trip(tmp_path):
    c = EmbeddingCache(tmp_path, "m")
    c.put([text_hash("x"), text_hash("y")], np.eye(3, dtype=np.float32)[:2])
    c.put([text_hash("z")], np.eye(3, dtype=np.float32)[2:])
    got = EmbeddingCache(tmp_path, "m").get([text_hash("x"), text_hash("z"), text_hash("w")])
    assert np.array_equal(got[0], [1, 0, 0]) and np.array_equal(got[1], [0, 0, 1]) and got[2] is None
    assert EmbeddingCache(tmp_path, "other").get([text_hash("x")]) == [None]


def test_embedding_cache_truncated_or_foreign_file_is_re_encoded(tmp_path, caplog):
    """A cache.npz cut short (a copy interrupted, a disk that filled) raised zipfile.BadZipFile out of every build
    that touched the cache, instead of being re-encoded and rewritten; vectors of the wrong rank likewise."""
    c = EmbeddingCache(tmp_path, "m")
    c.put([text_hash("x"), text_hash("y")], np.eye(3, dtype=np.float32)[:2])
    path = tmp_path / "m" / "cache.npz"
    whole = path.read_bytes()
    bad = {"truncated": whole[: len(whole) // 2], "garbage": b"PK\x03\x04 not a zip"}
    for what, data in bad.items():
        path.write_bytes(data)
        assert EmbeddingCache(tmp_path, "m").get([text_hash("x")]) == [None], what
    assert "unreadable" in caplog.text and str(path) in caplog.text
    np.savez(path, hashes=np.array([text_hash("x")], dtype="S64"), vectors=np.ones(3, dtype=np.float32))
    assert EmbeddingCache(tmp_path, "m").get([text_hash("x")]) == [None]  # 1-D vectors: not a cache of this format
    fresh = EmbeddingCache(tmp_path, "m")  # the next write replaces the broken file with a readable one
    fresh.put([text_hash("z")], np.eye(3, dtype=np.float32)[2:])
    assert np.array_equal(EmbeddingCache(tmp_path, "m").get([text_hash("z")])[0], [0, 0, 1])


def test_model_key_changes_with_any_weight_or_module_file(tmp_path):
    from llmrec.retrieval.encoder import model_key

    (tmp_path / "m" / "1_Pooling").mkdir(parents=True)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w1")
    (tmp_path / "m" / "1_Pooling" / "config.json").write_text("{}")
    k0 = model_key(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w2")  # same size, new weights
    k1 = model_key(tmp_path / "m")
    (tmp_path / "m" / "1_Pooling" / "config.json").write_text("{ }")
    k2 = model_key(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("docs")
    assert len({k0, k1, k2}) == 3 and model_key(tmp_path / "m") == k2


# ------------------------------------------------------------------------------------------------ text scoring
def test_knn_score_is_the_documented_kernel_sum(tiny_dataset, tmp_path):
    ret = _retriever(tiny_dataset, tmp_path, knn_neighbors=1000, recency_half_life=2.0, disliked_weight=0.3)
    ids = list(tiny_dataset.item_ids)
    hist = [(ids[0], True), (ids[1], False), (ids[2], None)]
    s = ret.knn_scores(hist)
    e = ret.vectors.astype(np.float64)
    w = np.array([0.5 ** (2 / 2), 0.3 * 0.5 ** (1 / 2), 1.0])
    want = np.zeros(len(ids))
    for h, wh in zip(range(3), w):
        k = np.exp((e[h] @ e.T - 1) / ret.knn_tau)
        k[h] = 0.0  # an item is not its own neighbour
        want += wh * k
    j = np.arange(3, len(ids))  # unseen items
    assert np.allclose(s[j], want[j], rtol=1e-4, atol=1e-8)


def test_cold_start_unknown_items_large_k_and_ties(tiny_dataset, tmp_path):
    ds = tiny_dataset
    for scoring in ("knn", "mean"):
        ret = _retriever(ds, tmp_path / scoring, scoring=scoring)
        pop = ret.query([], k=5)
        assert [i for i, _ in pop] == [i for i, _ in ret.popular(5)]
        # history items outside the catalogue (event store): ignored, as if absent, and never returned
        assert ret.query([("nope", True)], k=5) == pop
        h = [(ds.item_ids[0], True), ("nope", True)]
        assert ret.query(h, k=5) == ret.query(h[:1], k=5)
        # k above the unseen catalogue: every unseen item once
        allq = ret.query(h, k=10 * ds.n_items)
        got = [i for i, _ in allq]
        assert len(got) == len(set(got)) == ds.n_items - 1 and ds.item_ids[0] not in got
    # every item alike: ties keep one order, the same at every call
    flat = _retriever(ds, tmp_path / "same", same=True)
    q1 = flat.query([(ds.item_ids[3], True)], k=10)
    assert q1 == flat.query([(ds.item_ids[3], True)], k=10)


def test_candidates_exclude_title_twins_and_unknown_history(tiny_dataset, tmp_path):
    """Recommender.candidates: no seen item, no seen item's title twin, unknown history items skipped."""
    from llmrec.ranking.recommender import Recommender

    ds = tiny_dataset
    ret = _retriever(ds, tmp_path)
    rec = Recommender.__new__(Recommender)
    a, b, c = ds.item_ids[0], ds.item_ids[1], ds.item_ids[2]
    rec.ds, rec.retriever = ds, ret
    rec.cfg = SimpleNamespace(n_candidates=ds.n_items, exclude_seen_titles=True)
    rec.title_twins = {a: (b,), b: (a,)}
    ev = [SimpleNamespace(item_id=a, liked=True, timestamp=1), SimpleNamespace(item_id="zz", liked=None, timestamp=2)]
    got = [i for i, _ in rec.candidates(ev)]
    assert a not in got and b not in got and "zz" not in got and c in got
    assert len(got) == len(set(got)) == ds.n_items - 2
    got2 = [i for i, _ in rec.candidates(ev, exclude_seen_titles=False)]
    assert b in got2 and len(got2) == ds.n_items - 1


# ------------------------------------------------------------------------------------------------ contamination
_NATURAL = ["The Usual Suspects Again", "The Lion King Returns", "Toy Story Forever", "A Quiet Harvest Moon",
            "Les Misfits Rouges Noirs", "Crimson Tide Rising", "Velvet Goldmine Echo", "The Paper Kite Flies"]
_CATALOGUE = ["Usual Suspects Again, The (1995)", "Lion King Returns, The (1994)", "Toy Story Forever (1995)",
              "Quiet Harvest Moon, A (1993)", "Misfits Rouges Noirs, Les (1990)", "Crimson Tide Rising (1995)",
              "Velvet Goldmine Echo (1998)", "Paper Kite Flies, The (Cerf-volant, Le) (1994)"]
_YEARS = ["1995", "1994", "1995", "1993", "1990", "1995", "1998", "1994"]


class _MemorisingBackend:
    """A base model that has memorised the films under their real names (not MovieLens' "Title, The" form): it
    completes a title from its first words and knows each film's year."""

    def generate(self, prompts, max_new_tokens=64, **_):
        out = []
        for p in prompts:
            ans = ""
            if "titled \"" in p:
                prefix = p.split('titled "', 1)[1]
                for t in _NATURAL:
                    if t.startswith(prefix + " "):
                        ans = " " + t[len(prefix) + 1:] + '" is a film'
                        break
            elif "was released" in p:
                title = p.split('"')[1]
                ans = f" {_YEARS[_NATURAL.index(title)]}." if title in _NATURAL else " unknown"
            out.append(ans)
        return out


def test_contamination_probe_reads_movielens_inverted_titles():
    """ML-100K lists 354 of its multi-word titles as "Usual Suspects, The": a prompt of the first half of that form
    ('titled "Usual') can never be completed with "Suspects, The", so a quarter of the probe could not count as
    memorised however well the model knew the film. The probe must ask for the title as it is written."""
    from llmrec.ranking.evaluate import contamination_probe

    ds = SimpleNamespace(titles=np.array(_CATALOGUE), domain="movie",
                         items=pd.DataFrame({"title": _CATALOGUE, "year": _YEARS}))
    out = contamination_probe(_MemorisingBackend(), ds, n=len(_CATALOGUE), seed=0)
    assert out["n"] == len(_CATALOGUE)
    assert out["title_completion_rate"] == 1.0
    assert out["shuffled_control_rate"] == 0.0
    assert out["year_n"] == len(_CATALOGUE) and out["year_accuracy"] == 1.0


def test_natural_title():
    from llmrec.ranking.evaluate import natural_title

    assert natural_title("Usual Suspects, The (1995)") == "The Usual Suspects"
    assert natural_title("Appartement, L' (1996)") == "L'Appartement"
    assert natural_title("Double vie de Véronique, La (Double Life of Veronique, The) (1991)") == \
        "La Double vie de Véronique"
    assert natural_title("Toy Story (1995)") == "Toy Story"
    assert natural_title("Sex, Lies, and Videotape (1989)") == "Sex, Lies, and Videotape"
    assert natural_title("Nirvana") == "Nirvana"


def test_saved_index_and_its_meta_cannot_disagree(tmp_path):
    """Two builds saving into one folder (a re-prepared dataset, another nprobe) must never leave a meta.json that
    describes one index beside the vectors of the other: the index file is named by its meta's digest."""
    from llmrec.retrieval.index import build_index, load_index, save_index

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(np.float32)
    meta_a, meta_b = {"texts_sha": "a", "n_items": 5, "kind": "flat"}, {"texts_sha": "b", "n_items": 7, "kind": "flat"}
    save_index(build_index(a), tmp_path, meta_a)
    assert load_index(tmp_path, meta_a).ntotal == 5
    save_index(build_index(b), tmp_path, meta_b)
    assert load_index(tmp_path, meta_a) is None
    assert load_index(tmp_path, meta_b).ntotal == 7
    assert len(list(tmp_path.glob("*.faiss"))) == 1
    # a folder from before index files were named by their meta: rebuilt, never trusted
    import faiss

    faiss.write_index(build_index(a), str(tmp_path / "index.faiss"))
    (tmp_path / "meta.json").write_text(json.dumps(meta_a))
    assert load_index(tmp_path, meta_a) is None


def test_an_index_meta_that_is_not_a_json_object_means_rebuild(tmp_path):
    """A meta.json holding valid JSON that is not an object (`[]`, `null`: a file overwritten by hand or by another
    tool) raised AttributeError out of every retriever build instead of rebuilding the index."""
    from llmrec.retrieval.index import build_index, load_index, save_index

    meta = {"texts_sha": "a", "n_items": 3, "kind": "flat"}
    save_index(build_index(np.eye(3, dtype=np.float32)), tmp_path, meta)
    for text in ("[1, 2]", "null", '"index"'):
        (tmp_path / "meta.json").write_text(text)
        assert load_index(tmp_path, meta) is None, text


def test_split_histories_refuse_train_which_has_no_cut_off(tiny_dataset, tmp_path):
    """`split_history` (behind TextRetriever / ItemCF `score_items`) took split="train" as every event: the user's
    valid and test targets were scored as history, where the baselines, `history_indices` and `history_before`
    refuse that split and the error message listed only 'valid', 'test' or 'all'."""
    from llmrec.retrieval import ItemCF
    from llmrec.retrieval.text import split_history

    ds = tiny_dataset
    u = ds.user_ids[0]
    assert len(split_history(ds, u, "all")) == len(split_history(ds, u, "test")) + 1
    ret, cf = _retriever(ds, tmp_path), ItemCF().fit(ds)
    for score in (ret.score_items, cf.score_items):
        with pytest.raises(ValueError, match="split must be 'valid', 'test' or 'all', got 'train'"):
            score([u], "train")


def test_fusion_refuses_settings_that_silently_drop_or_misalign_a_ranking(tiny_dataset, tmp_path):
    """rrf_fuse zipped weights with rankings (one weight too few dropped a ranking without a word), broadcast a
    [1, n_items] matrix over n users, and HybridRetriever / EnsembleRetriever accepted a collaborative model built on
    another catalogue (its scores were then read against the text retriever's item order)."""
    import copy

    from llmrec.retrieval import EnsembleRetriever, HybridRetriever, ItemCF, rrf_fuse

    a, b = np.array([[3.0, 2.0, 1.0]] * 2), np.array([[1.0, 2.0, 3.0]] * 2)
    assert np.allclose(rrf_fuse([a, b], [1.0, 1.0])[0], [1 / 61 + 1 / 63, 2 / 62, 1 / 63 + 1 / 61])
    with pytest.raises(ValueError, match="1 weights for 2 rankings"):
        rrf_fuse([a, b], [1.0])
    with pytest.raises(ValueError, match=r"matrix 1 has shape \(1, 3\)"):
        rrf_fuse([a, b[:1]])
    with pytest.raises(ValueError, match="exclude lists 1 users"):
        rrf_fuse([a, b], exclude=[np.array([0])])
    for bad in ({"rrf_k": -1.0}, {"weights": [1.0, float("nan")]}, {"depth": 0}):
        with pytest.raises(ValueError, match="rrf_fuse"):
            rrf_fuse([a, b], **bad)
    with pytest.raises(ValueError, match="no score matrices"):
        rrf_fuse([])

    ds = tiny_dataset
    text, cf = _retriever(ds, tmp_path), ItemCF().fit(ds)
    with pytest.raises(ValueError, match=r"1 weights for 2 rankings"):
        HybridRetriever(text, cf, weights=(1.0,))
    with pytest.raises(ValueError, match="depth"):
        HybridRetriever(text, cf, depth=0)
    other = copy.copy(ds)
    other.items = ds.items.iloc[::-1].reset_index(drop=True)  # same items, another order
    other.item_ids = other.items["item_id"].to_numpy()
    other.item_index = {i: n for n, i in enumerate(other.item_ids)}
    moved = ItemCF().fit(other)
    with pytest.raises(ValueError, match="catalogues differ"):
        HybridRetriever(text, moved)
    with pytest.raises(ValueError, match="catalogues differ"):
        EnsembleRetriever([cf, moved])
    HybridRetriever(text, ItemCF().fit(copy.copy(ds)))  # another object of the same catalogue is fine


def test_text_encoder_names_a_folder_that_is_not_a_model(tmp_path):
    """A model_path that exists but holds no model (an empty or wrong folder, a file) was accepted and failed only
    at the first encode, with sentence-transformers' 'Should have a `model_type` key in its config.json'."""
    from llmrec.retrieval import TextEncoder

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    for p in (tmp_path / "empty", tmp_path / "weights.bin"):
        with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder.*modules.json"):
            TextEncoder(p, cache_dir=tmp_path / "emb")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder(tmp_path / "missing", cache_dir=tmp_path / "emb")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "modules.json").write_text("[]")
    assert TextEncoder(tmp_path / "ok", cache_dir=tmp_path / "emb").key.startswith("ok-")  # nothing loaded yet


def test_a_negative_or_fractional_k_is_refused_not_sliced_from_the_end(tiny_dataset, tmp_path):
    """k=-1 sliced lists from the end: `candidates_for(..., k=-1)` with a hybrid retriever returned every fused
    candidate but the last two (33 items here) and the "mean" text search all but one of its hits; k=0 stays an
    empty list."""
    from llmrec.retrieval import HybridRetriever, ItemCF, ModelRetriever, candidates_for

    ds = tiny_dataset
    u, first = ds.user_ids[0], ds.item_ids[0]
    knn, mean = _retriever(ds, tmp_path / "knn"), _retriever(ds, tmp_path / "mean", scoring="mean")
    cf = ItemCF().fit(ds)
    rets = [knn, mean, cf, HybridRetriever(knn, cf), ModelRetriever(cf)]
    for ret in rets:
        for bad in (-1, -5, 2.5, True):
            with pytest.raises(ValueError, match="integer >= 0"):
                ret.query([(first, True)], k=bad)
        assert ret.query([(first, True)], k=0) == []
        assert len(ret.query([(first, True)], k=np.int64(4))) == 4
    for ret in (knn, rets[3]):
        with pytest.raises(ValueError, match="candidates_for.*got -1"):
            candidates_for(ds, u, "test", -1, ret)
        assert candidates_for(ds, u, "test", 0, ret) == []


def test_rrf_depth_counts_only_each_rankings_top_and_deeper_ranks_only_break_ties():
    """`depth` (HybridRetriever.score_items, the published hybrid figures) had no test: by hand, with rrf_k=0."""
    from llmrec.retrieval import rrf_fuse

    a = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    b = a[:, ::-1].copy()
    got = rrf_fuse([a, b], [1.0, 2.0], rrf_k=0.0, depth=2)[0]
    ra, rb = np.arange(1, 6), np.arange(5, 0, -1)
    want = [(1 / x if x <= 2 else 1e-6 / x) + (2 / y if y <= 2 else 2e-6 / y) for x, y in zip(ra, rb)]
    assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert got.argsort()[::-1].tolist() == [4, 0, 3, 1, 2]  # item 2 is in neither top 2: last
    full = rrf_fuse([a, b], [1.0, 2.0], rrf_k=0.0)[0]
    assert np.allclose(full, [1 / x + 2 / y for x, y in zip(ra, rb)])


def test_tied_text_scores_fall_back_to_training_popularity_then_catalogue_order(tiny_dataset, tmp_path):
    """Every item embedded alike: the knn scores tie, and the order is the documented tie-break (training popularity,
    then catalogue order), not merely the same at every call."""
    ds = tiny_dataset
    flat = _retriever(ds, tmp_path, same=True)
    seen = ds.item_ids[3]
    got = [i for i, _ in flat.query([(seen, True)], k=10)]
    order = sorted((j for j in range(ds.n_items) if ds.item_ids[j] != seen), key=lambda j: (-flat._pop[j], j))
    assert got == [str(ds.item_ids[j]) for j in order[:10]]


def test_cold_start_list_stops_after_k_items(tiny_dataset, tmp_path):
    """`popular` (every cold-start query) tested each item of the catalogue against `exclude` and built the whole
    list before keeping k: a Python loop over the catalogue per query. Same list, k + |excluded met| look-ups now."""
    ds = tiny_dataset
    ret = _retriever(ds, tmp_path)

    class Counting(set):
        calls = 0

        def __contains__(self, x):
            Counting.calls += 1
            return super().__contains__(x)

    order = sorted(range(ds.n_items), key=lambda j: (-ret._pop[j], j))
    ex = Counting({str(ds.item_ids[order[0]])})
    got = ret.popular(5, ex)
    assert [i for i, _ in got] == [str(ds.item_ids[j]) for j in order[1:6]]
    assert np.allclose([s for _, s in got], ret._pop[order[1:6]] / ret._pop.max())
    assert Counting.calls <= 6 < ds.n_items
