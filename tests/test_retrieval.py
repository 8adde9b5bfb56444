"""Retrieval: MiniLM text retriever (cache, persisted faiss index), ItemCF, RRF hybrid, leakage-safe candidates."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from llmrec.retrieval import (
    EmbeddingCache,
    HybridRetriever,
    ItemCF,
    TextEncoder,
    TextRetriever,
    candidates_for,
    history_before,
    rrf_fuse,
    training_candidates,
)
from llmrec.retrieval.text import top_unseen

pytest.importorskip("sentence_transformers")
pytest.importorskip("faiss")


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """One MiniLM load for the whole session, with its own embedding cache."""
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="session")
def text_ret(tiny_dataset, encoder, tmp_path_factory):
    return TextRetriever(encoder=encoder, cache_dir=tmp_path_factory.mktemp("ret")).build(tiny_dataset, progress=False)


@pytest.fixture(scope="session")
def itemcf(tiny_dataset):
    return ItemCF().fit(tiny_dataset)


def genre(ds, item_id):
    return ds.items.iloc[ds.item_index[item_id]]["genres"]


def with_changed_future(ds, user, splits):
    """A copy of `ds` where the user's events of `splits` point at different items (what must not matter)."""
    d2 = copy.copy(ds)
    inter = ds.interactions.copy()
    seen = set(inter.loc[inter["user_id"] == user, "item_id"])
    spare = [i for i in ds.item_ids if i not in seen]
    rows = inter.index[(inter["user_id"] == user) & inter["split"].isin(splits)]
    for n, r in enumerate(rows):
        inter.loc[r, "item_id"] = spare[n]
    d2.interactions = inter
    d2.__dict__.pop("_by_user", None)
    return d2


def test_encoder_normalises_and_caches(encoder, tmp_path):
    enc = TextEncoder(encoder.path, cache_dir=tmp_path)
    enc._model = encoder.model  # share the loaded model
    v = enc.encode(["a space opera", "a romantic comedy", "a space opera"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(v[0], v[2]) and enc.last_stats["encoded"] == 3
    calls = []
    orig = enc.encode_uncached
    enc.encode_uncached = lambda texts, progress=False: calls.append(list(texts)) or orig(texts)
    v2 = enc.encode(["a romantic comedy", "a heist thriller", "a space opera"])
    assert calls == [["a heist thriller"]]  # only the new text is encoded
    assert np.allclose(v2[0], v[1], atol=1e-6) and np.allclose(v2[2], v[0], atol=1e-6)
    # a new process (fresh cache object) reads the same vectors from disk, keyed by the model
    fresh = EmbeddingCache(tmp_path, enc.key).get([__import__("hashlib").sha256(b"a heist thriller").hexdigest()])
    assert fresh[0] is not None and np.allclose(fresh[0], v2[1])
    assert EmbeddingCache(tmp_path, "other-model").get(["x"]) == [None]


def test_query_returns_unseen_topk_and_follows_genre(tiny_dataset, text_ret):
    ds = tiny_dataset
    for u in ds.user_ids[:12]:
        hist = history_before(ds, u, "test")
        res = text_ret.query(hist, k=10)
        ids = [i for i, _ in res]
        assert len(ids) == 10 and len(set(ids)) == 10 and not set(ids) & {i for i, _, _ in hist}
        assert all(a[1] >= b[1] for a, b in zip(res, res[1:]))
    hits = 0
    for g in ("Action", "Comedy", "Drama", "Horror"):
        own = [i for i in ds.item_ids if genre(ds, i) == g][:3]
        other = next(i for i in ds.item_ids if genre(ds, i) != g)
        res = text_ret.query([(i, True, n) for n, i in enumerate(own)] + [(other, False, 9)], k=5)
        hits += sum(genre(ds, i) == g for i, _ in res)
    assert hits >= 16  # of 20: liked texts pull their genre up (base rate 25%)


def test_score_items_agrees_with_index(tiny_dataset, text_ret):
    ds = tiny_dataset
    users = list(ds.user_ids[:5])
    s = text_ret.score_items(users, "test")
    assert s.shape == (5, ds.n_items)
    for r, u in enumerate(users):
        hist = history_before(ds, u, "test")
        seen = {ds.item_index[i] for i, _, _ in hist}
        order = [j for j in np.argsort(-s[r], kind="stable") if j not in seen][:5]
        got = [ds.item_index[i] for i, _ in text_ret.query(hist, k=5)]
        assert np.allclose(s[r, order], s[r, got], atol=1e-5)  # same scores (ties may swap)


def test_disliked_items_are_down_weighted(tiny_dataset, text_ret):
    ds = tiny_dataset
    a, b = str(ds.item_ids[0]), str(ds.item_ids[1])
    both_liked = text_ret.query_vector([(a, True, 0), (b, True, 1)])
    b_disliked = text_ret.query_vector([(a, True, 0), (b, False, 1)])
    va, vb = text_ret.vectors[0], text_ret.vectors[1]
    assert float(b_disliked @ vb - b_disliked @ va) < float(both_liked @ vb - both_liked @ va)
    zero = TextRetriever(encoder=text_ret.encoder, disliked_weight=0.0, cache_dir=text_ret.cache_root).build(ds)
    assert np.allclose(zero.query_vector([(a, True, 0), (b, False, 1)]), va, atol=1e-5)
    # recency: the newest item weighs more than the oldest
    q = text_ret.query_vector([(a, True, 0), (b, True, 1)])
    assert float(q @ vb) > float(q @ va) or np.allclose(va, vb)


def test_cold_start_and_text_profile(tiny_dataset, text_ret):
    res = text_ret.query([("not-an-item", True, 0)], k=5)
    assert len(res) == 5  # popular items
    prof = text_ret.query_text("horror story", k=8)
    assert sum(genre(tiny_dataset, i) == "Horror" for i, _ in prof) >= 6


def test_index_is_persisted_and_ivf_option(tiny_dataset, text_ret, encoder):
    again = TextRetriever(encoder=encoder, cache_dir=text_ret.cache_root).build(tiny_dataset)
    assert again.stats["index_loaded"] == 1.0 and again.stats["encoded"] == 0
    assert len(list(text_ret.index_folder.glob("index-*.faiss"))) == 1
    hist = history_before(tiny_dataset, tiny_dataset.user_ids[0], "test")
    assert again.query(hist, k=10) == text_ret.query(hist, k=10)
    ivf = TextRetriever(encoder=encoder, index="ivf", nprobe=64, cache_dir=text_ret.cache_root).build(tiny_dataset)
    assert type(ivf.index).__name__ == "IndexIVFFlat" and ivf.index_folder != text_ret.index_folder
    # nprobe covers every list here, so IVF is exact
    assert [i for i, _ in ivf.query(hist, k=10)] == [i for i, _ in text_ret.query(hist, k=10)]


def test_rrf_fuse_formula():
    a = np.array([[3.0, 2.0, 1.0, 0.0]])
    b = np.array([[0.0, 1.0, 3.0, 2.0]])
    f = rrf_fuse([a, b], rrf_k=60)
    # ranks a: 1,2,3,4; b: 4,3,1,2
    want = [1 / 61 + 1 / 64, 1 / 62 + 1 / 63, 1 / 63 + 1 / 61, 1 / 64 + 1 / 62]
    assert np.allclose(f[0], want)
    g = rrf_fuse([a, b], rrf_k=60, exclude=[np.array([2])])
    assert np.isneginf(g[0, 2])
    # ranks among unseen items only: a: 1,2,-,3; b: 3,2,-,1
    assert np.allclose(g[0, [0, 1, 3]], [1 / 61 + 1 / 63, 1 / 62 + 1 / 62, 1 / 63 + 1 / 61])


def test_hybrid_scores_and_queries(tiny_dataset, text_ret, itemcf):
    ds = tiny_dataset
    hyb = HybridRetriever(text_ret, itemcf, weights=(1.0, 1.0))
    users = list(ds.user_ids[:4])
    s = hyb.score_items(users, "test")
    assert s.shape == (4, ds.n_items)
    for r, u in enumerate(users):
        seen = [ds.item_index[i] for i, _, _ in history_before(ds, u, "test")]
        assert np.all(s[r, seen] == -1.0) and np.all(np.delete(s[r], seen) > 0)
    hist = history_before(ds, users[0], "test")
    res = hyb.query(hist, k=10)
    assert len(res) == 10 and not {i for i, _ in res} & {i for i, _, _ in hist}
    # fused order = RRF of the two lists
    t = [i for i, _ in text_ret.query(hist, k=200)]
    c = [i for i, _ in itemcf.query(hist, k=200)]
    want = sorted(set(t) | set(c), key=lambda i: -sum(1 / (60 + lst.index(i) + 1) for lst in (t, c) if i in lst))
    assert [i for i, _ in res] == want[:10]
    w = HybridRetriever(text_ret, itemcf, weights=(0.5, 1.0)).query(hist, k=10)
    want = sorted(set(t) | set(c), key=lambda i: -sum(wt / (60 + lst.index(i) + 1) for wt, lst in ((0.5, t), (1, c))
                                                      if i in lst))
    assert [i for i, _ in w] == want[:10]


class UserOnlyCF:
    """A baseline-like model that scores known users only (score_items), like BPR."""

    def __init__(self, ds):
        self.ds = ds
        self.calls = []

    def score_items(self, user_ids, split="test"):
        self.calls.append((list(user_ids), split))
        rng = np.random.default_rng(len(self.calls))
        return rng.random((len(user_ids), self.ds.n_items))


def test_hybrid_with_a_user_scoring_model(tiny_dataset, text_ret):
    ds = tiny_dataset
    cf = UserOnlyCF(ds)
    hyb = HybridRetriever(text_ret, cf)
    u = ds.user_ids[0]
    res = candidates_for(ds, u, "valid", 10, hyb)
    assert cf.calls[-1] == ([u], "valid") and len(res) == 10
    hist = history_before(ds, u, "valid")
    assert hyb.query(hist, k=10) and len(cf.calls) == 1  # no user id: text ranking only, cf not called


def test_candidates_use_only_data_before_the_target(tiny_dataset, text_ret, itemcf, encoder):
    """Leakage: changing what happens at or after the target never changes the candidates."""
    ds = tiny_dataset
    for u in list(ds.user_ids[:6]):
        for split, future in (("test", ["test"]), ("valid", ["valid", "test"])):
            d2 = with_changed_future(ds, u, future)
            t2 = TextRetriever(encoder=encoder, cache_dir=text_ret.cache_root).build(d2)
            assert candidates_for(ds, u, split, 15, text_ret) == candidates_for(d2, u, split, 15, t2)
            h1 = HybridRetriever(text_ret, itemcf)
            h2 = HybridRetriever(t2, ItemCF().fit(d2))
            assert candidates_for(ds, u, split, 15, h1) == candidates_for(d2, u, split, 15, h2)
            if split == "valid":
                d3 = with_changed_future(ds, u, ["train"])  # sanity: the allowed history does matter
                assert candidates_for(ds, u, split, 15, text_ret) != candidates_for(d3, u, split, 15, text_ret)
        # the true item is never added to evaluation candidates
        tgt = ds.targets("test").set_index("user_id").loc[u, "item_id"]
        big = [i for i, _ in candidates_for(ds, u, "test", ds.n_items, text_ret)]
        small = [i for i, _ in candidates_for(ds, u, "test", 5, text_ret)]
        assert small == big[:5] and (tgt in small) == (big.index(tgt) < 5)


def test_sasrec_hybrid_candidates_never_see_the_test_target(tiny_dataset, text_ret, encoder):
    """Leakage for `hybrid:sasrec`: SASRec trains on the train split only (early stopping on valid), so changing the
    users' test events changes neither the model nor any test candidate list."""
    from llmrec.baselines import get_model

    cfg = {"epochs": 10, "hidden": 32, "max_len": 16, "batch_size": 16, "lr": 0.01, "eval_every": 5, "patience": 10}
    ds = tiny_dataset
    users = list(ds.user_ids[:4])
    d2 = ds
    for u in users:
        d2 = with_changed_future(d2, u, ["test"])
    s1, s2 = get_model("sasrec", **cfg).fit(ds, progress=False), get_model("sasrec", **cfg).fit(d2, progress=False)
    t2 = TextRetriever(encoder=encoder, cache_dir=text_ret.cache_root).build(d2)
    h1, h2 = HybridRetriever(text_ret, s1, weights=(0.25, 1.0)), HybridRetriever(t2, s2, weights=(0.25, 1.0))
    for u in users:
        assert candidates_for(ds, u, "test", 15, h1) == candidates_for(d2, u, "test", 15, h2)
    # sanity: the test-time history (train + valid) does matter
    d3 = with_changed_future(ds, users[0], ["valid"])
    assert candidates_for(ds, users[0], "test", 15, h1) != candidates_for(d3, users[0], "test", 15, h1)


def test_candidates_at_a_training_position(tiny_dataset, text_ret):
    ds = tiny_dataset
    u = ds.user_ids[1]
    g = ds.history(u, before="all")
    pos = int(g["pos"].iloc[6])
    hist = history_before(ds, u, pos=pos)
    assert [i for i, _, _ in hist] == g["item_id"].iloc[:6].tolist()
    got = {i for i, _ in candidates_for(ds, u, k=10, retriever=text_ret, pos=pos)}
    assert not got & {i for i, _, _ in hist}
    with pytest.raises(ValueError, match="split must be"):
        history_before(ds, u, "train")


def test_training_candidates_insert_target(tiny_dataset, text_ret):
    ds = tiny_dataset
    u = ds.user_ids[2]
    retrieved = [i for i, _ in candidates_for(ds, u, "test", 20, text_ret)]
    missing = next(i for i in reversed(ds.item_ids) if i not in retrieved and i not in
                   {h for h, _, _ in history_before(ds, u, "test")})
    ids, ins = training_candidates(ds, u, missing, 20, text_ret, "test", seed=3)
    assert ins and len(ids) == 20 and missing in ids and ids.count(missing) == 1
    assert [i for i in ids if i != missing] == retrieved[:19]  # the last retrieved one made room
    again, _ = training_candidates(ds, u, missing, 20, text_ret, "test", seed=3)
    assert again == ids
    positions = {training_candidates(ds, u, missing, 20, text_ret, "test", seed=s)[0].index(missing)
                 for s in range(12)}
    assert len(positions) > 3  # random position, not always first/last
    ids2, ins2 = training_candidates(ds, u, missing, 20, text_ret, "test", insert_target=False)
    assert not ins2 and ids2 == retrieved
    hit = retrieved[4]
    ids3, ins3 = training_candidates(ds, u, hit, 20, text_ret, "test")
    assert not ins3 and ids3 == retrieved
    with pytest.raises(ValueError, match="k=0"):  # k=0 gave a list of the target alone, one letter to choose from
        training_candidates(ds, u, missing, 0, text_ret, "test")
    shuffled, _ = training_candidates(ds, u, hit, 20, text_ret, "test", shuffle=True, seed=1)
    assert sorted(shuffled) == sorted(retrieved) and shuffled != retrieved


def test_itemcf_is_fitted_on_train_only(tiny_dataset, itemcf):
    ds = tiny_dataset
    u = ds.user_ids[0]
    d2 = with_changed_future(ds, u, ["valid", "test"])
    assert (ItemCF().fit(d2).sim != itemcf.sim).nnz == 0
    d3 = with_changed_future(ds, u, ["train"])
    assert (ItemCF().fit(d3).sim != itemcf.sim).nnz > 0
    s = itemcf.score_items([u], "test")
    assert s.shape == (1, ds.n_items) and np.isfinite(s).all()


def test_knn_scoring_matches_the_formula(tiny_dataset, text_ret):
    """score(i) = sum_h w_h exp((cos(e_h, e_i) - 1) / tau), w_h = 0.5 ** (age / half_life) x disliked_weight,
    computed here by hand over the full cosine matrix (the tiny catalogue is smaller than knn_neighbors)."""
    ds, r = tiny_dataset, text_ret
    assert r.scoring == "knn" and ds.n_items <= r.knn_neighbors
    a, b, c = (str(ds.item_ids[j]) for j in (0, 3, 7))
    hist = [(a, True, 0), (b, False, 1), (c, True, 2)]
    w = np.array([0.5 ** (2 / r.half_life), 0.5 ** (1 / r.half_life) * r.disliked_weight, 1.0])
    e = r.vectors.astype(np.float64)
    k = np.exp((e[[0, 3, 7]] @ e.T - 1.0) / r.knn_tau)
    for row, j in enumerate((0, 3, 7)):
        k[row, j] = 0.0  # an item is not its own neighbour
    want = w @ k + 1e-9 * r._pop / r._pop.max()  # + the popularity tie-break
    got = r.knn_scores(hist)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-12)
    top = r.query(hist, k=5)
    assert {a, b, c}.isdisjoint(i for i, _ in top)
    unseen = np.delete(want, [0, 3, 7])
    assert np.allclose([sc for _, sc in top], np.sort(unseen)[::-1][:5], rtol=1e-4, atol=1e-8)
    assert np.allclose([want[ds.item_index[i]] for i, _ in top], [sc for _, sc in top], rtol=1e-4, atol=1e-8)


def test_mean_scoring_option_and_bad_options(tiny_dataset, text_ret):
    mean = TextRetriever(encoder=text_ret.encoder, scoring="mean", cache_dir=text_ret.cache_root).build(tiny_dataset)
    hist = history_before(tiny_dataset, tiny_dataset.user_ids[0], "test")
    q = mean.query_vector(hist)
    s = mean.score_items([tiny_dataset.user_ids[0]], "test")[0]
    assert np.allclose(s, mean.vectors @ q, atol=1e-5)
    assert [i for i, _ in mean.query(hist, k=5)] == [i for i, _ in mean.search(q, 5, {i for i, _, _ in hist})]
    with pytest.raises(ValueError, match="scoring must be 'knn' or 'mean'"):
        TextRetriever(encoder=text_ret.encoder, scoring="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="knn_tau"):
        TextRetriever(encoder=text_ret.encoder, knn_tau=0)


def test_rank_training_examples_list_retrieved_candidates(tiny_dataset, text_ret, itemcf):
    """`candidates: retrieval` fine-tuning data: every split's candidates are the retriever's list for the user's
    events before the target (train: before its position), minus history, with the target shuffled in once."""
    from llmrec.finetune.config import DataSettings
    from llmrec.finetune.data import build_examples
    from llmrec.prompts import WhitespaceTokenizer

    ds, n = tiny_dataset, 6
    hyb = HybridRetriever(text_ret, itemcf)
    cfg = DataSettings(n_train=12, n_valid=6, n_test=6, candidates="retrieval", n_candidates=n, max_len=4000,
                       history_max=3)
    ex = build_examples(ds, "rank", cfg, WhitespaceTokenizer(), retriever=hyb)
    assert all(len(ex[s]) > 0 for s in ("train", "valid", "test"))
    positions = []
    for split, rows in ex.items():
        for e in rows:
            assert e.candidate_ids.count(e.item_id) == 1 and e.candidate_ids[e.label] == e.item_id
            ev = ds.history(e.user_id, before="all")
            pos = int(ev.loc[ev["item_id"].astype(str) == e.item_id, "pos"].iloc[0])
            before = set(ev.loc[ev["pos"] < pos, "item_id"].astype(str))
            assert not before & set(e.candidate_ids)
            # train: nor any item the user rates later in the training split (`exclude_later`), the list read on
            later = set(ev.loc[(ev["split"] == "train") & (ev["pos"] > pos), "item_id"].astype(str)) - {e.item_id}
            later = later if split == "train" else set()
            got = candidates_for(ds, e.user_id, split, n + len(later), hyb, pos=pos if split == "train" else None)
            want = [i for i, _ in got if i != e.item_id and i not in later][: n - 1]
            assert sorted(set(e.candidate_ids) - {e.item_id}) == sorted(want), (split, e.user_id)
            positions.append(e.label)
    assert len(set(positions)) > 1  # the target's letter is shuffled, not always first (retrieval order)
    pop = build_examples(ds, "rank", DataSettings(n_train=12, n_valid=0, n_test=0, n_candidates=n, max_len=4000,
                                                  history_max=3), WhitespaceTokenizer())
    assert [e.candidate_ids for e in pop["train"]] != [e.candidate_ids for e in ex["train"]]


def test_k_zero_returns_nothing(tiny_dataset, text_ret, itemcf):
    """k=0 used to return one item (top_unseen appended before checking the count)."""
    assert top_unseen(np.array([3.0, 2.0, 1.0]), ["a", "b", "c"], set(), 0) == []
    hist = history_before(tiny_dataset, tiny_dataset.user_ids[0], "test")
    assert text_ret.query(hist, k=0) == [] and itemcf.query(hist, k=0) == []
    assert candidates_for(tiny_dataset, tiny_dataset.user_ids[0], "test", 0, text_ret) == []


def test_model_key_changes_with_weights_of_the_same_size_and_module_configs(tmp_path):
    """The embedding cache and index are keyed by `model_key`: it used to hash only the weight files' sizes and the
    top-level json files, so a re-trained model (same architecture, same file size) or another pooling module
    (`1_Pooling/config.json`) reused the old vectors."""
    from llmrec.retrieval.encoder import model_key

    m = tmp_path / "my-encoder"
    (m / "1_Pooling").mkdir(parents=True)
    (m / "config.json").write_text('{"hidden_size": 4}')
    (m / "modules.json").write_text('[{"idx": 1, "path": "1_Pooling"}]')
    (m / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (m / "vocab.txt").write_text("a\nb\n")
    (m / "model.safetensors").write_bytes(b"\x01" * 256)
    k0 = model_key(m)
    assert model_key(m) == k0 and k0.startswith("my-encoder-")
    (m / "model.safetensors").write_bytes(b"\x02" * 256)  # new weights, same size
    k1 = model_key(m)
    assert k1 != k0
    (m / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    k2 = model_key(m)
    assert k2 not in (k0, k1)
    (m / "vocab.txt").write_text("a\nc\n")  # another tokenizer vocabulary
    assert model_key(m) not in (k0, k1, k2)


def test_default_retriever_is_rebuilt_when_the_catalogue_changes(tiny_dataset, monkeypatch, tmp_path):
    """`default_retriever` memoised one retriever per dataset folder: a dataset re-prepared in the same folder with
    the same number of items but other titles kept getting candidates from the old catalogue's texts."""
    from llmrec.retrieval import candidates as cand_mod
    from llmrec.retrieval import default_retriever

    monkeypatch.setattr(cand_mod, "_RETRIEVERS", {})
    built = []
    enc = TextEncoder(cache_dir=tmp_path / "emb")

    class Counting(TextRetriever):
        def build(self, ds, progress=True):
            built.append(ds)
            return super().build(ds, progress)

    monkeypatch.setattr("llmrec.retrieval.text.TextRetriever",
                        lambda *a, **k: Counting(encoder=enc, cache_dir=tmp_path))
    ds = tiny_dataset
    r1 = default_retriever(ds)
    assert default_retriever(ds) is r1 and default_retriever(copy.copy(ds)) is r1 and len(built) == 1
    d2 = copy.copy(ds)
    items = ds.items.copy()
    items["title"] = list(reversed(items["title"].tolist()))  # same ids and count, other titles
    d2.items = items
    r2 = default_retriever(d2)
    assert r2 is not r1 and r2.ds is d2 and len(built) == 2
    assert not np.allclose(r2.vectors, r1.vectors)
