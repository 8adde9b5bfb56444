"""Baselines: each model learns the planted pattern of the tiny dataset better than random, scores exclude the
user's history, checkpoints round-trip, and the shared evaluation path is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrec.baselines import get_model, load_model
from llmrec.evaluation import evaluate_ranking, evaluate_yesno, yesno_subset

FAST = {
    "pop": {},
    "mf": {"epochs": 30, "dim": 8, "lr": 0.05, "batch_size": 256, "patience": 30},
    "bpr": {"epochs": 30, "dim": 16, "lr": 0.05, "batch_size": 128, "eval_every": 5, "patience": 10},
    "sasrec": {"epochs": 40, "hidden": 32, "max_len": 16, "batch_size": 16, "lr": 0.01, "eval_every": 5,
               "patience": 10, "dropout": 0.1},
}


def random_ndcg(ds, n_seeds: int = 20) -> float:
    vals = []
    for s in range(n_seeds):
        rng = np.random.default_rng(s)
        vals.append(evaluate_ranking(ds, lambda u, r=rng: r.random((len(u), ds.n_items)))["ndcg@10"])
    return float(np.mean(vals))


@pytest.fixture(scope="module")
def fitted(tiny_dataset, tmp_path_factory):
    out = {}
    for name, cfg in FAST.items():
        out[name] = get_model(name, **cfg).fit(tiny_dataset, progress=False)
    return out


@pytest.mark.parametrize("name", ["mf", "bpr", "sasrec"])
def test_beats_random_on_planted_pattern(tiny_dataset, fitted, name):
    m = evaluate_ranking(tiny_dataset, lambda u: fitted[name].score_items(list(u), "test"))
    rnd = random_ndcg(tiny_dataset)
    assert m["ndcg@10"] > rnd + 0.05, (name, m["ndcg@10"], rnd)


def test_mf_yesno_learns_planted_likes(tiny_dataset, fitted):
    ex = yesno_subset(tiny_dataset, "test")
    assert ex["label"].nunique() == 2
    res = evaluate_yesno(fitted["mf"].predict_proba(ex), ex)
    assert res["auc"] > 0.6, res


def test_next_item_models_have_no_yesno(fitted, tiny_dataset):
    ex = yesno_subset(tiny_dataset, "test")
    for name in ("pop", "bpr", "sasrec"):
        with pytest.raises(NotImplementedError, match="next-item model: it has no Yes/No prediction"):
            fitted[name].predict_proba(ex)


@pytest.mark.parametrize("name", list(FAST))
def test_scores_exclude_history_not_target(tiny_dataset, fitted, name):
    ds = tiny_dataset
    users = ds.targets("test")["user_id"].tolist()[:10]
    for split, hist_splits in (("test", ("train", "valid")), ("valid", ("train",))):
        s = fitted[name].score_items(users, split)
        assert s.shape == (len(users), ds.n_items)
        tgt = ds.targets(split).set_index("user_id")["item_id"]
        for r, u in enumerate(users):
            g = ds.interactions[(ds.interactions["user_id"] == u)]
            seen = [ds.item_index[i] for i in g[g["split"].isin(hist_splits)]["item_id"]]
            assert np.all(np.isneginf(s[r, seen]))
            assert np.isfinite(s[r, ds.item_index[tgt[u]]])
            assert np.isfinite(s[r]).sum() == ds.n_items - len(seen)


def test_pop_counts_only_allowed_events(tiny_dataset, fitted):
    """valid scores count the train events, test scores the train + valid events: never a test target."""
    ds = tiny_dataset
    inter = ds.interactions
    u = ds.targets("test")["user_id"].iloc[0]
    for split, allowed in (("valid", ["train"]), ("test", ["train", "valid"])):
        s = fitted["pop"].score_items([u], split)[0]
        counts = inter[inter["split"].isin(allowed)]["item_id"].map(ds.item_index).value_counts()
        fin = np.isfinite(s)
        expect = np.zeros(ds.n_items)
        expect[counts.index.to_numpy()] = counts.to_numpy()
        np.testing.assert_array_equal(s[fin], expect[fin])


def test_history_splits_never_hold_the_target(tiny_dataset, fitted):
    m = fitted["sasrec"]
    ds = tiny_dataset
    for split in ("valid", "test"):
        tg = ds.targets(split).set_index("user_id")["item_id"]
        for u, t in tg.items():
            items, _ = m.history_of(u, split)
            assert ds.item_index[t] not in set(items.tolist())
            assert len(items) == len(ds.history(u, before=split))


def test_sasrec_input_is_causal(tiny_dataset, fitted):
    """Changing an item *after* position t must not change the hidden state at t."""
    import torch

    net = fitted["sasrec"].net
    net.eval()
    x = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 2]])
    y = x.clone()
    y[0, -1] = 13
    with torch.no_grad():
        a, b = net(x), net(y)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name", list(FAST))
def test_checkpoint_roundtrip_same_scores(tiny_dataset, fitted, tmp_path, name):
    users = tiny_dataset.targets("test")["user_id"].tolist()
    path = fitted[name].save(tmp_path / name)
    loaded = load_model(name, tiny_dataset.name, path=str(path), ds=tiny_dataset)
    np.testing.assert_array_equal(loaded.score_items(users), fitted[name].score_items(users))
    assert loaded.fit_info == fitted[name].fit_info


def test_same_seed_same_model(tiny_dataset, fitted):
    again = get_model("bpr", **FAST["bpr"]).fit(tiny_dataset, progress=False)
    users = tiny_dataset.targets("test")["user_id"].tolist()
    np.testing.assert_allclose(again.score_items(users), fitted["bpr"].score_items(users))


def test_shared_evaluation_identical_for_identical_scores(tiny_dataset, fitted):
    ds = tiny_dataset
    users = ds.targets("test")["user_id"].tolist()
    mat = fitted["sasrec"].score_items(users, "test")
    row = {u: i for i, u in enumerate(users)}
    a = evaluate_ranking(ds, lambda us: mat[[row[u] for u in us]], batch_users=7)
    b = evaluate_ranking(ds, lambda us: fitted["sasrec"].score_items(list(us), "test"))
    # the history is excluded by the evaluation itself too: raw scores with finite history give the same numbers
    raw = np.where(np.isneginf(mat), 1e9, mat)
    c = evaluate_ranking(ds, lambda us: raw[[row[u] for u in us]])
    assert a == b == c


def test_config_errors(tiny_dataset):
    from llmrec.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        get_model("sasrec", hiden=64)
    with pytest.raises(KeyError, match="unknown baseline"):
        get_model("svd")
    with pytest.raises(RuntimeError, match="fit"):
        get_model("bpr").score_items(["u1"])


def test_cli_train_and_eval(tiny_home, tiny_dataset, monkeypatch, capsys):
    from llmrec.cli import main

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    assert main(["baselines", "train", "--dataset", "tiny", "--model", "pop", "--no-progress"]) == 0
    assert (tiny_home / "models" / "baselines" / "tiny" / "pop" / "meta.json").is_file()
    assert main(["baselines", "train", "--dataset", "tiny", "--model", "mf", "--no-progress",
                 "--set", "epochs=3", "dim=4"]) == 0
    capsys.readouterr()
    assert main(["baselines", "eval", "--dataset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| pop |" in out and "| mf |" in out
    assert main(["baselines", "eval", "--dataset", "tiny", "--model", "sasrec"]) == 1  # no checkpoint: clear error


def test_time_budget_stops_before_the_epoch_that_would_overrun(monkeypatch):
    """Budget 100 s, epochs of 30 s then one of 40 s: after 30 s (next one ends ~60) and 60 s (~90) it continues;
    after 100 s (2 epochs of 30 and one of 40) it stops. The old check (`elapsed > budget` after an epoch) would
    have started a fourth epoch at 100 s."""
    import llmrec.baselines.base as base

    clock = [0.0]
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock[0])
    b = base.TimeBudget(100.0)
    out = []
    for dt in (30.0, 30.0, 40.0, 10.0):
        clock[0] += dt
        out.append(b.epoch_done())
    assert out[:3] == [False, False, True]
    clock[0] = 0.0
    never = base.TimeBudget(None)
    for _ in range(3):
        clock[0] += 1000.0
        assert not never.epoch_done()
    clock[0] = 0.0
    b = base.TimeBudget(10.0)
    clock[0] = 50.0
    assert b.epoch_done()  # the first epoch always runs, then the budget is spent


def test_time_budget_is_kept_by_a_baseline(tiny_dataset):
    """A budget smaller than one epoch: training stops after the first epoch and says so."""
    m = get_model("bpr", epochs=50, eval_every=1, time_budget_s=1e-6, patience=50)
    m.fit(tiny_dataset, progress=False)
    assert m.fit_info["stopped_by_time_budget"] is True and m.fit_info["epochs"] == 1


def test_sasrec_scores_an_arbitrary_history_like_a_known_user(tiny_dataset, fitted):
    """`score_history` (used for event-store users) gives the known user's unmasked scores from the same events;
    unknown item ids are skipped, not an error."""
    sas = fitted["sasrec"]
    u = tiny_dataset.targets("test")["user_id"].iloc[0]
    items, _ = sas.history_of(u, "test")
    ids = [tiny_dataset.item_ids[i] for i in items]
    want = sas._score([u], "test")[0]
    np.testing.assert_allclose(sas.score_history(ids), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sas.score_history([(i, True, 0) for i in ids] + [("no-such-item", True, 0)]), want,
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(sas.score_history(ids[:-1]), want)


def assert_retriever_ranks_as(ds, model, name: str) -> None:
    """`--retriever <name>` (a baseline alone): candidates for a history are the baseline's own top unseen items,
    and the full-ranking scores order every user's items as the baseline does (seen items last, finite)."""
    from llmrec.ranking.factory import build_retriever, collaborative_name

    assert collaborative_name(name) == name and collaborative_name(f"hybrid:{name}") == name
    ret = build_retriever(ds, name, cf_model=model)
    users = ds.targets("test")["user_id"].tolist()
    base = model.score_items(users, "test")
    got = ret.score_items(users, "test")
    assert np.isfinite(got).all()
    for r in range(len(users)):
        seen = np.isneginf(base[r])
        assert got[r][seen].max() < got[r][~seen].min()
        np.testing.assert_array_equal(np.argsort(-got[r][~seen], kind="stable"),
                                      np.argsort(-base[r][~seen], kind="stable"))
    items, labs = model.history_of(users[0], "test")
    hist = [(ds.item_ids[i], bool(lab), 0) for i, lab in zip(items, labs)]
    top = ret.query(hist, k=5)
    assert [i for i, _ in top] == [ds.item_ids[j] for j in np.argsort(-base[0], kind="stable")[:5]]
    assert ret.similar_texts("a", ["a", "b"]).shape == (2,)  # generate mode maps titles through the text side


def test_sasrec_alone_as_the_retriever_ranks_as_sasrec(tiny_dataset, fitted):
    assert_retriever_ranks_as(tiny_dataset, fitted["sasrec"], "sasrec")


def test_a_model_without_score_history_cannot_be_a_retriever_alone(fitted):
    from llmrec.retrieval import ModelRetriever

    with pytest.raises(ValueError, match="no score_history"):
        ModelRetriever(fitted["mf"])


def test_ensemble_retriever_fuses_full_rankings_by_weighted_rrf(tiny_dataset, fitted):
    """`--retriever ensemble`: score(i) = sum_m w_m / (60 + rank_m(i)) over each user's unseen items, the same from
    `score_items` (evaluation) and from `query` on the history (the service); weight 0 leaves one model's order."""
    from llmrec.retrieval import EnsembleRetriever, ItemCF, ModelRetriever, history_before

    ds, sas = tiny_dataset, fitted["sasrec"]
    cf = ItemCF().fit(ds)
    users = ds.targets("test")["user_id"].tolist()[:5]
    ens = EnsembleRetriever([sas, cf], [1.0, 2.0])
    got = ens.score_items(users, "test")
    seen_idx, _ = sas.history_of(users[0], "test")
    seen = np.zeros(ds.n_items, bool)
    seen[seen_idx] = True
    hist = history_before(ds, users[0], "test")

    def ranks(s: np.ndarray) -> np.ndarray:  # 1 = best unseen item; by hand, one item at a time; ties: mean rank
        s = np.where(seen, -np.inf, np.asarray(s, dtype=np.float64))
        return np.array([1 + (s > s[j]).sum() + ((s == s[j]).sum() - 1) / 2 for j in range(len(s))])

    want = 1.0 / (60 + ranks(sas.score_history(hist))) + 2.0 / (60 + ranks(cf.score_history(hist)))
    np.testing.assert_allclose(got[0][~seen], want[~seen])
    assert got[0][seen].max() < got[0][~seen].min() and np.isfinite(got).all()
    top = [i for i, _ in ens.query(hist, k=8)]
    assert top == [ds.item_ids[j] for j in np.argsort(-np.where(seen, -np.inf, want), kind="stable")[:8]]
    sas_only = EnsembleRetriever([sas, cf], [1.0, 0.0]).query(hist, k=8)
    assert [i for i, _ in sas_only] == [i for i, _ in ModelRetriever(sas).query(hist, k=8)]
    assert top != [i for i, _ in sas_only]  # the second model's weight moves the list
    with pytest.raises(ValueError, match="no score_history"):
        EnsembleRetriever([sas, fitted["mf"]])
    with pytest.raises(ValueError, match="2 models but 1 weights"):
        EnsembleRetriever([sas, cf], [1.0])


def test_ensemble_retriever_is_built_from_the_named_models(tiny_dataset, fitted, monkeypatch):
    from llmrec.ranking import factory
    from llmrec.retrieval import ItemCF

    models = {"sasrec": fitted["sasrec"], "itemcf": ItemCF().fit(tiny_dataset)}
    monkeypatch.setattr(factory, "ENSEMBLE_WEIGHTS", {"sasrec": 1.0, "itemcf": 0.5})
    monkeypatch.setattr(factory, "collaborative_model", lambda ds, name: models[name])
    ret = factory.build_retriever(tiny_dataset, "ensemble")
    assert [type(m).__name__ for m in ret.models] == ["SASRec", "ItemCF"] and ret.weights == (1.0, 0.5)
    assert ret.similar_texts("a", ["a", "b"]).shape == (2,)  # generate mode maps titles through the text side
    mine = ItemCF(shrink=0.0).fit(tiny_dataset)  # the bench passes the baselines it fitted on the same split
    assert factory.build_retriever(tiny_dataset, "ensemble", fitted={"itemcf": mine}).models[1] is mine


def test_hybrid_sasrec_retriever_loads_the_checkpoint(tiny_dataset, fitted, tmp_path, monkeypatch):
    from llmrec.baselines import checkpoint_dir
    from llmrec.ranking.factory import build_retriever, collaborative_model

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llmrec baselines train"):
        collaborative_model(tiny_dataset, "sasrec", fit_if_missing=False)
    with pytest.raises(ValueError, match="unknown retriever 'hybrid:svd'"):
        build_retriever(tiny_dataset, "hybrid:svd")
    fitted["sasrec"].save(checkpoint_dir("tiny", "sasrec"))
    ret = build_retriever(tiny_dataset, "hybrid:sasrec")
    users = tiny_dataset.targets("test")["user_id"].tolist()
    np.testing.assert_array_equal(ret.cf.score_items(users), fitted["sasrec"].score_items(users))
    hist = [tiny_dataset.item_ids[i] for i in fitted["sasrec"].history_of(users[0], "test")[0]]
    got = ret.query(hist, k=10)
    assert len(got) == 10 and not {i for i, _ in got} & set(hist)
    # the collaborative side moves the ranking: not the text retriever's order alone
    assert [i for i, _ in got] != [i for i, _ in ret.text.query(hist, k=10)]


def test_retriever_names_and_defaults_agree_across_cli_service_and_factory():
    """`llmrec recommend` / `eval rank`, the service (typed default and serve/config.yaml) and the factory offer the
    same retrievers and answer with the same default retriever and fusion weight (one user, one answer)."""
    import argparse
    import typing

    from llmrec.cli import recommend as cli
    from llmrec.ranking import factory
    from llmrec.service.config import ServiceConfig, load_service_config

    hints = typing.get_type_hints(ServiceConfig)
    assert list(factory.RETRIEVERS) == cli.RETRIEVER_CHOICES == list(typing.get_args(hints["retriever"]))
    assert factory.DEFAULT_RETRIEVER in factory.RETRIEVERS and factory.DEFAULT_RETRIEVER != "text"
    shipped = load_service_config(Path(__file__).resolve().parent.parent / "serve" / "config.yaml", environ={})
    for retriever, weight in [(cli.DEFAULT_RETRIEVER, cli.DEFAULT_RETRIEVAL_WEIGHT),
                              (ServiceConfig().retriever, ServiceConfig().retrieval_weight),
                              (shipped.retriever, shipped.retrieval_weight)]:
        assert (retriever, weight) == (factory.DEFAULT_RETRIEVER, factory.DEFAULT_RETRIEVAL_WEIGHT)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    for argv in (["recommend", "--user-id", "1"], ["eval", "rank", "--dataset", "x"]):
        a = parser.parse_args(argv)
        assert (a.retriever, a.retrieval_weight) == (factory.DEFAULT_RETRIEVER, factory.DEFAULT_RETRIEVAL_WEIGHT)
        assert a.listings == ServiceConfig().listings == shipped.listings == factory.RankingConfig().listings == 1
    assert parser.parse_args(["recommend", "--user-id", "1", "--listings", "4"]).listings == 4


def test_few_shot_caps_draw_the_fine_tuning_rows_and_mf_fits_on_them_only(tiny_dataset):
    """`max_train_examples` / `max_valid_examples` with the recipe's seed select exactly the rows fine-tuning trains
    and validates on (the few-shot comparison in finetune/bench.py report), and MF sees no other training user."""
    from llmrec.baselines.base import yesno_train_valid
    from llmrec.finetune.config import DataSettings
    from llmrec.finetune.data import build_examples
    from llmrec.prompts import WhitespaceTokenizer

    n_tr, n_va, seed, eval_seed = 24, 10, 3, 0  # the recipe's data.seed and data.eval_seed (its default)
    ex = build_examples(tiny_dataset, "yesno", DataSettings(n_train=n_tr, n_valid=n_va, n_test=4, seed=seed,
                                                            max_len=400), WhitespaceTokenizer())
    tr, va = yesno_train_valid(tiny_dataset, n_tr, n_va, seed, valid_seed=eval_seed)
    assert len(tr) == n_tr and len(va) == n_va
    assert [(e.user_id, e.item_id) for e in ex["train"]] == list(zip(tr["user_id"], tr["item_id"]))
    assert [(e.user_id, e.item_id) for e in ex["valid"]] == list(zip(va["user_id"], va["item_id"]))
    all_train = tiny_dataset.yesno[tiny_dataset.yesno["split"] == "train"]
    assert len(all_train) > n_tr  # the cap is a real cut on this dataset
    m = get_model("mf", max_train_examples=n_tr, max_valid_examples=n_va, seed=seed, valid_seed=eval_seed,
                  **FAST["mf"])
    m.fit(tiny_dataset, progress=False)
    assert set(m.user_index) == set(tr["user_id"].astype(str))
    assert yesno_train_valid(tiny_dataset, n_tr, n_va, seed)[1].equals(yesno_train_valid(  # valid_seed None: seed
        tiny_dataset, n_tr, n_va, seed, valid_seed=seed)[1])


def test_fit_runs_on_its_own_thread_count_and_restores_the_process_one(tiny_dataset):
    """A baseline trains on `threads` (1 by default) but leaves the process's torch thread count as it was: the LLM
    scored after it in the same process (`llmrec bench`, a service fitting its SASRec retriever) ran on one thread."""
    import torch

    from llmrec.baselines.base import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = []
        model = get_model("sasrec", epochs=1, max_len=8, hidden=32)
        fit = model._fit
        model._fit = lambda ds, progress=True: (seen.append(torch.get_num_threads()), fit(ds, progress=progress))
        model.fit(tiny_dataset, progress=False)
        assert seen == [1] and torch.get_num_threads() == 3
        with pytest.raises(RuntimeError), torch_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError("a failed fit restores the count too")
        assert torch.get_num_threads() == 3
        with torch_threads(None):
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_mf_ranking_never_trains_on_a_leave_one_out_target(tiny_dataset):
    """MF fits on the time-split Yes/No `train` rows, and many of those are a user's leave-one-out valid/test event
    (a user whose last events come before `t_valid`). Its next-item ranking must not have been trained on them: the
    test ranking is the same whatever the labels of those rows say, while its Yes/No head still fits every row."""
    import copy

    ds = tiny_dataset
    inter = ds.interactions
    held = set(zip(inter.loc[inter["split"] != "train", "user_id"], inter.loc[inter["split"] != "train", "item_id"]))
    ys = ds.yesno
    is_held = np.array([(u, i) in held for u, i in zip(ys["user_id"], ys["item_id"])])
    assert (is_held & (ys["split"] == "train").to_numpy()).sum() > 0  # the case exists on this dataset
    flipped = copy.copy(ds)
    flipped.__dict__["yesno"] = ys.assign(label=np.where(is_held, 1 - ys["label"], ys["label"]).astype(np.int8))
    users = ds.targets("test")["user_id"].tolist()
    a = get_model("mf", **FAST["mf"]).fit(ds, progress=False)
    b = get_model("mf", **FAST["mf"]).fit(flipped, progress=False)
    for split in ("test", "valid"):
        np.testing.assert_array_equal(a.score_items(users, split), b.score_items(users, split))
    ex = yesno_subset(ds, "test")  # the Yes/No head does fit the flipped rows (they are before t_valid: no leak)
    assert not np.array_equal(a.predict_proba(ex), b.predict_proba(ex))


def test_mf_checkpoint_without_ranking_net_is_refused_and_refitted(tiny_dataset, fitted, tmp_path, monkeypatch):
    """A checkpoint written before MF's ranking net left out the leave-one-out events is refused with a ValueError
    naming the fix, and `load_or_fit` fits such a checkpoint again instead of ranking with it."""
    import torch

    from llmrec.baselines import checkpoint_dir, load_or_fit

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    ck = fitted["mf"].save(checkpoint_dir(tiny_dataset.name, "mf"))
    state = torch.load(ck / "state.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if not k.startswith("rank_")}, ck / "state.pt")
    with pytest.raises(ValueError, match="refit it: llmrec baselines train --model mf"):
        load_model("mf", tiny_dataset.name, path=str(ck), ds=tiny_dataset)
    model, how = load_or_fit("mf", tiny_dataset)
    assert how.startswith("fitted")
    users = tiny_dataset.targets("test")["user_id"].tolist()
    assert model.score_items(users).shape == (len(users), tiny_dataset.n_items)


def _dense_dataset(root: Path, n_users: int = 6, n_items: int = 20):
    """Every user has all but one item, so a uniform negative hits a positive most of the time."""
    import pandas as pd

    from llmrec.data import PrepareConfig, load_prepared, prepare

    rows = [(f"u{u}", f"i{j}", 1000 * u + k) for u in range(n_users)
            for k, j in enumerate(j for j in range(n_items) if j != u)]
    # one user with every item in `train` but their valid/test targets i0x, i1x: the only negatives left
    rows += [("full", f"i{j}", 9000 + j) for j in range(n_items)] + [("full", "i0x", 9999), ("full", "i1x", 10000)]
    p = root / "dense.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(p, index=False)
    items = root / "dense_items.csv"
    ids = [f"i{j}" for j in range(n_items)] + ["i0x", "i1x"]
    pd.DataFrame({"item_id": ids, "title": ids}).to_csv(items, index=False)
    prepare(str(p), PrepareConfig(items_file=str(items), name="dense"), home=root)
    return load_prepared("dense", home=root)


def test_bpr_negatives_are_never_a_users_training_item(tmp_path, monkeypatch):
    """BPR's negative for (u, i) must be an item u never had in `train`: after a few resampling rounds a dense user's
    negative could still be one of their own positives, trained as 'ranked below' their own item."""
    import llmrec.baselines.classic as classic

    ds = _dense_dataset(tmp_path)
    calls: list[tuple[str, np.ndarray]] = []
    make = classic._MFNet.make

    def spy(*a):
        net = make(*a)
        net.P.register_forward_hook(lambda m, inp, out: calls.append(("P", inp[0].numpy().copy())))
        net.Q.register_forward_hook(lambda m, inp, out: calls.append(("Q", inp[0].numpy().copy())))
        return net

    monkeypatch.setattr(classic._MFNet, "make", staticmethod(spy))
    model = get_model("bpr", epochs=3, dim=4, batch_size=16, eval_every=100)
    model.fit(ds, progress=False)
    tr = ds.interactions[ds.interactions["split"] == "train"]
    seen = {(model.user_index[u], ds.item_index[i]) for u, i in zip(tr["user_id"], tr["item_id"])}
    n = 0
    for k in range(len(calls) - 2):
        (a, u), (b, i), (c, j) = calls[k : k + 3]
        if (a, b, c) == ("P", "Q", "Q"):
            assert all((x, y) in seen for x, y in zip(u, i))
            bad = [(x, y) for x, y in zip(u, j) if (x, y) in seen]
            assert not bad, f"{len(bad)} of {len(j)} negatives are the user's own training items"
            n += len(j)
    assert n > 0


def test_sasrec_bce_negative_is_never_the_target(tiny_dataset, monkeypatch):
    """loss='bce' draws one negative per position; one equal to that position's target trains the target as both the
    positive and the negative (1 in n_items positions on a uniform draw)."""
    import llmrec.baselines.sasrec as sasrec

    calls: list[np.ndarray] = []
    make = sasrec._make_net

    def spy(*a):
        net = make(*a)
        net.item.register_forward_hook(lambda m, inp, out: calls.append(inp[0].numpy().copy()))
        return net

    monkeypatch.setattr(sasrec, "_make_net", spy)
    get_model("sasrec", loss="bce", epochs=3, hidden=16, max_len=16, eval_every=100).fit(tiny_dataset, progress=False)
    pairs = [(a, b) for a, b in zip(calls, calls[1:]) if a.ndim == 1 and b.ndim == 1 and a.shape == b.shape]
    assert pairs
    hit = sum(int((a == b).sum()) for a, b in pairs)
    assert hit == 0, f"{hit} bce negatives equal their position's target"
