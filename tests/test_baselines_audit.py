"""Audit of the baselines against their reference designs (SASRec, BPR, MF, BERT+LSTM) on the tiny fixture:
causal masking, padding invariance, the padding id never scored, history masking, leakage-free training sequences,
early stopping on `valid` only, fixed seeds, per-user rows (no index off-by-one), popularity counts and the serving
path (`score_history`) agreeing with the evaluation path (`score_items`)."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.baselines import get_model

SAS = {"epochs": 6, "hidden": 16, "max_len": 16, "batch_size": 16, "lr": 0.01, "eval_every": 3, "patience": 10,
       "dropout": 0.1}
BPR = {"epochs": 6, "dim": 8, "lr": 0.05, "batch_size": 128, "eval_every": 3, "patience": 10}
MF = {"epochs": 5, "dim": 8, "lr": 0.05, "batch_size": 256, "patience": 10}


@pytest.fixture(scope="module")
def models(tiny_dataset):
    return {
        "pop": get_model("pop").fit(tiny_dataset, progress=False),
        "mf": get_model("mf", **MF).fit(tiny_dataset, progress=False),
        "bpr": get_model("bpr", **BPR).fit(tiny_dataset, progress=False),
        "sasrec": get_model("sasrec", **SAS).fit(tiny_dataset, progress=False),
    }


def _random_net(n_items: int = 30, max_len: int = 12, **kw):
    import torch

    from llmrec.baselines.sasrec import SASRecConfig, _make_net

    torch.manual_seed(0)
    net = _make_net(n_items, SASRecConfig(hidden=16, blocks=2, heads=2, max_len=max_len, dropout=0.0, **kw))
    net.eval()
    return net


# ------------------------------------------------------------------------------------------------ SASRec network
def test_sasrec_no_position_attends_to_a_later_one():
    """Perturbing the item at position j changes no hidden state at a position < j (every j, random net)."""
    import torch

    net = _random_net()
    x = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 2, 4, 6, 8, 10]])
    with torch.no_grad():
        base = net(x)
        for j in range(2, x.shape[1]):
            y = x.clone()
            y[0, j] = 29 if int(x[0, j]) != 29 else 28
            out = net(y)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, j], base[:, j])


def test_sasrec_padding_is_ignored():
    """The number of left pads (batch cut vs `max_len` at scoring), and what sits in the padding slots' embedding
    row, never change a real position's output."""
    import torch

    net = _random_net(max_len=12)
    seq = torch.tensor([4, 8, 15, 16, 23])
    with torch.no_grad():
        outs = [net(torch.cat([torch.zeros(p, dtype=torch.long), seq])[None])[0, -len(seq):] for p in (0, 1, 7)]
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-5)
        # a batch with a longer neighbour gives the same rows
        long = torch.arange(1, 13)[None]
        both = torch.cat([torch.cat([torch.zeros(7, dtype=torch.long), seq])[None], long])
        torch.testing.assert_close(net(both)[0, -len(seq):], outs[0], rtol=0, atol=1e-5)
        # garbage in the pad embedding row never reaches a real position (pads are masked as keys)
        net.item.weight[0].normal_()
        padded = torch.cat([torch.zeros(7, dtype=torch.long), seq])[None]
        torch.testing.assert_close(net(padded)[0, -len(seq):], outs[0], rtol=0, atol=1e-5)


def test_sasrec_never_scores_the_padding_id(models, tiny_dataset):
    """Logits cover exactly the catalogue (row 0 of the shared embedding, the pad, is not an item) and the pad row
    stays zero through training."""
    import torch

    m = models["sasrec"]
    assert m.net.item.weight.shape[0] == tiny_dataset.n_items + 1
    assert torch.count_nonzero(m.net.item.weight[0]) == 0
    h = torch.randn(3, m.cfg.hidden)
    np.testing.assert_allclose(m.net.logits(h).detach().numpy(), (h @ m.net.item.weight[1:].T).detach().numpy())
    u = tiny_dataset.targets("test")["user_id"].iloc[0]
    assert m.score_items([u]).shape == (1, tiny_dataset.n_items)


def test_sasrec_training_sequences_never_hold_a_valid_or_test_target(tiny_dataset, monkeypatch):
    """The (input, target) rows SASRec trains on are each user's `train` events only."""
    from llmrec.baselines.sasrec import SASRec

    seen: list[list[np.ndarray]] = []
    pad = SASRec._pad

    def spy(self, seqs):
        seen.append([np.asarray(s).copy() for s in seqs])
        return pad(self, seqs)

    monkeypatch.setattr(SASRec, "_pad", spy)
    m = get_model("sasrec", **{**SAS, "epochs": 1})
    m.fit(tiny_dataset, progress=False)
    inp, tgt = seen[0], seen[1]  # the first two calls build the training tensors
    users = [u for u, (items, _) in m.histories("valid").items() if len(items) >= 2]
    assert len(inp) == len(tgt) == len(users)
    held = tiny_dataset.interactions[tiny_dataset.interactions["split"] != "train"]
    held_of = held.groupby("user_id")["item_id"].agg(lambda s: {tiny_dataset.item_index[i] for i in s}).to_dict()
    for u, x, y in zip(users, inp, tgt):
        train = [tiny_dataset.item_index[i] for i in tiny_dataset.history(u, before="valid")["item_id"]]
        np.testing.assert_array_equal(np.concatenate([x, y[-1:]]), train)
        assert not (set(x.tolist()) | set(y.tolist())) & held_of.get(u, set())


def test_sasrec_serving_path_equals_evaluation_path_for_every_user(models, tiny_dataset):
    """`score_history` of a user's events (any length, including more than `max_len`) equals the unmasked
    `_score` of that user, for both splits, in one batch."""
    m = models["sasrec"]
    for split in ("valid", "test"):
        users = tiny_dataset.targets(split)["user_id"].tolist()
        want = m._score(users, split)
        for r, u in enumerate(users):
            ids = [tiny_dataset.item_ids[i] for i in m.history_of(u, split)[0]]
            np.testing.assert_allclose(m.score_history(ids), want[r], rtol=1e-5, atol=1e-5)
    long = [tiny_dataset.item_ids[i % tiny_dataset.n_items] for i in range(40)]  # > max_len: the last max_len count
    np.testing.assert_allclose(m.score_history(long), m.score_history(long[-m.cfg.max_len:]), rtol=1e-6)


# ------------------------------------------------------------------------------------------- every ranking model
@pytest.mark.parametrize("name", ["pop", "mf", "bpr", "sasrec"])
def test_rows_belong_to_their_user(models, tiny_dataset, name):
    """Batch order and batch company never change a user's row (no index off-by-one), and every history item is
    -inf while everything else is finite."""
    m = models[name]
    users = tiny_dataset.targets("test")["user_id"].tolist()[:9]
    batch = m.score_items(users, "test")
    rev = m.score_items(users[::-1], "test")[::-1]
    np.testing.assert_allclose(batch, rev, rtol=1e-5, atol=1e-6)
    for r, u in enumerate(users):
        np.testing.assert_allclose(m.score_items([u], "test")[0], batch[r], rtol=1e-5, atol=1e-6)
        seen = {tiny_dataset.item_index[i] for i in tiny_dataset.history(u, before="test")["item_id"]}
        assert set(np.flatnonzero(np.isneginf(batch[r])).tolist()) == seen
        assert np.isfinite(np.delete(batch[r], sorted(seen))).all()


@pytest.mark.parametrize("name", ["mf", "bpr"])
def test_mf_nets_score_the_users_own_embedding(models, tiny_dataset, name):
    """p_u . q_i + b_i with u's own row: the net's forward pass for (u, i) minus the user and global biases."""
    import torch

    m = models[name]
    net = m.rank_net if name == "mf" else m.net
    index = m.rank_user_index if name == "mf" else m.user_index
    users = [u for u in tiny_dataset.targets("test")["user_id"].tolist() if u in index][:5]
    assert users
    s = m._score(users, "test")
    for r, u in enumerate(users):
        uu = torch.full((tiny_dataset.n_items,), index[u])
        with torch.no_grad():
            full, _, _ = net(uu, torch.arange(tiny_dataset.n_items))
            expect = full - net.bu(uu).squeeze(-1) - net.b0
        np.testing.assert_allclose(s[r], expect.numpy(), rtol=1e-5, atol=1e-5)


def test_bpr_negatives_are_uniform_over_unseen_items():
    """Each user's negatives are spread evenly over exactly the items they never had (not popularity-weighted)."""
    from llmrec.baselines.classic import _bpr_negatives

    n_items = 10
    seen = {0 * n_items + j for j in (0, 1, 2)} | {1 * n_items + j for j in range(9)}
    u = np.array([0] * 7000 + [1] * 50)
    neg = _bpr_negatives(u, seen, n_items, np.random.default_rng(0))
    assert set(neg[u == 1].tolist()) == {9}
    counts = np.bincount(neg[u == 0], minlength=n_items)
    assert counts[:3].sum() == 0
    assert counts[3:].min() > 850 and counts[3:].max() < 1150  # 1000 expected each


def test_popularity_counts_the_events_before_the_target(models, tiny_dataset):
    """valid: counts over train; test: over train+valid; never a test event."""
    inter = tiny_dataset.interactions
    c = models["pop"].counts
    for split, keep in (("valid", ["train"]), ("test", ["train", "valid"])):
        want = np.bincount(inter[inter["split"].isin(keep)]["item_id"].map(tiny_dataset.item_index),
                           minlength=tiny_dataset.n_items)
        np.testing.assert_array_equal(c[split], want)
    assert c["test"].sum() == (inter["split"] != "test").sum()


@pytest.mark.parametrize("name", ["bpr", "sasrec"])
def test_early_stopping_reads_the_valid_split_only(tiny_dataset, monkeypatch, name):
    """During `fit` every ranking evaluation is on `valid` (train history), never `test`."""
    import llmrec.evaluation as ev

    splits: list[str] = []
    real = ev.evaluate_ranking

    def spy(ds, fn, split="test", *a, **kw):
        splits.append(split)
        return real(ds, lambda u: (splits.append(f"score:{split}"), fn(u))[1], split, *a, **kw)

    monkeypatch.setattr(ev, "evaluate_ranking", spy)
    from llmrec.baselines.base import Baseline

    scored: list[str] = []
    orig = Baseline.score_items

    def score_spy(self, users, split="test"):
        scored.append(split)
        return orig(self, users, split)

    monkeypatch.setattr(Baseline, "score_items", score_spy)
    cfg = {**(SAS if name == "sasrec" else BPR), "epochs": 2, "eval_every": 1}
    get_model(name, **cfg).fit(tiny_dataset, progress=False)
    assert splits and set(s for s in splits if not s.startswith("score:")) == {"valid"}
    assert scored and set(scored) == {"valid"}


def test_mf_early_stops_on_valid_rows_and_trains_on_train_rows(tiny_dataset):
    from llmrec.baselines.base import yesno_train_valid

    tr, va = yesno_train_valid(tiny_dataset, None, None, 0)
    assert set(tr["split"]) == {"train"} and set(va["split"]) == {"valid"}
    assert tr["timestamp"].max() < va["timestamp"].min()


@pytest.mark.parametrize("name", ["sasrec", "mf"])
def test_same_seed_same_scores(tiny_dataset, models, name):
    cfg = SAS if name == "sasrec" else MF
    again = get_model(name, **cfg).fit(tiny_dataset, progress=False)
    users = tiny_dataset.targets("test")["user_id"].tolist()
    np.testing.assert_allclose(again.score_items(users), models[name].score_items(users), rtol=1e-6)


# --------------------------------------------------------------------------------------------------- BERT + LSTM
@pytest.fixture(scope="module")
def bert_next(tiny_dataset, tmp_path_factory):
    pytest.importorskip("transformers")
    from llmrec.baselines.text import default_bert_path

    try:
        default_bert_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("bert_cache_audit")
    return get_model("bert_lstm", cache_dir=str(cache), tasks=["next"], epochs_next=2, eval_every_next=1,
                     seq_batch_size=16, seq_len=8, proj=16, hidden=16).fit(tiny_dataset, progress=False)


def test_bert_lstm_serving_path_equals_evaluation_path_for_every_user(bert_next, tiny_dataset):
    """score_history((item, liked)) equals `_score` for every user and split, whatever type the like flag has
    (bool, numpy bool, 0/1 int as stored in `interactions.label`)."""
    m = bert_next
    for split in ("valid", "test"):
        users = tiny_dataset.targets(split)["user_id"].tolist()
        want = m._score(users, split)
        for r, u in enumerate(users):
            items, labs = m.history_of(u, split)
            ids = [tiny_dataset.item_ids[i] for i in items]
            for cast in (bool, np.bool_, int, np.int8):
                got = m.score_history([(i, cast(lab)) for i, lab in zip(ids, labs)])
                np.testing.assert_allclose(got, want[r], rtol=1e-5, atol=1e-5, err_msg=f"{u} {split} {cast}")


def test_bert_lstm_rows_belong_to_their_user_and_mask_history(bert_next, tiny_dataset):
    users = tiny_dataset.targets("test")["user_id"].tolist()[:9]
    batch = bert_next.score_items(users, "test")
    np.testing.assert_allclose(bert_next.score_items(users[::-1], "test")[::-1], batch, rtol=1e-5, atol=1e-6)
    for r, u in enumerate(users):
        seen = {tiny_dataset.item_index[i] for i in tiny_dataset.history(u, before="test")["item_id"]}
        assert set(np.flatnonzero(np.isneginf(batch[r])).tolist()) == seen


def test_bert_lstm_training_sequences_never_hold_a_valid_or_test_target(bert_next, tiny_dataset):
    """The next-item task reads `histories('valid')`: each user's `train` events only."""
    for u, (items, _) in bert_next.histories("valid").items():
        train = [tiny_dataset.item_index[i] for i in tiny_dataset.history(u, before="valid")["item_id"]]
        np.testing.assert_array_equal(items, train)


@pytest.mark.parametrize("name", ["pop", "mf", "bpr", "sasrec"])
def test_score_items_names_an_unknown_user_or_split(models, tiny_dataset, name):
    """BPR's user lookup failed with a bare KeyError('nobody') and Popularity's count lookup with KeyError('bogus');
    every model now says which user or split is wrong before scoring anything."""
    m = models[name]
    known = tiny_dataset.targets("test")["user_id"].iloc[0]
    with pytest.raises(KeyError, match=rf"{name}: 1 unknown user\(s\) in dataset tiny, e.g. 'nobody'"):
        m.score_items([known, "nobody"], "test")
    with pytest.raises(ValueError, match=rf"{name}: split must be one of \['all', 'test', 'valid'\], got 'bogus'"):
        m.score_items([known], "bogus")


def test_mf_early_stops_on_the_training_loss_when_the_valid_rows_hold_one_class(tiny_dataset, caplog):
    """One valid row (a few-shot cap) has one class: its AUC is NaN, which no later epoch beats, so MF kept its first
    epoch whatever the later ones learned (best_epoch 1, valid_auc NaN). It now early-stops on the training loss,
    says so in the log and in fit_info, and keeps the epoch with the lowest loss (the last, on this data)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="llmrec.baselines.base"):
        m = get_model("mf", **{**MF, "epochs": 6, "patience": 2, "max_valid_examples": 1}).fit(tiny_dataset,
                                                                                             progress=False)
    assert "valid Yes/No rows all have label" in caplog.text
    for prefix in ("", "rank_"):
        assert m.fit_info[f"{prefix}valid_auc"] is None
        assert m.fit_info[f"{prefix}early_stopping"].startswith("training loss: the 1 valid Yes/No rows all have")
        assert m.fit_info[f"{prefix}best_epoch"] == m.fit_info[f"{prefix}epochs"] == 6


@pytest.mark.parametrize(("name", "cfg", "msg"), [
    ("mf", {"epochs": 0}, "epochs: must be > 0, got 0"),  # failed in load_state_dict(None)
    ("bpr", {"epochs": 0}, "epochs: must be > 0, got 0"),  # UnboundLocalError 'ep'
    ("sasrec", {"epochs": 0}, "epochs: must be > 0, got 0"),
    ("mf", {"batch_size": 0}, "batch_size: must be > 0, got 0"),  # range() arg 3 must not be zero
    ("mf", {"dim": -1}, "dim: must be > 0, got -1"),  # torch: negative dimension
    ("mf", {"l2": -0.1}, "l2: must be >= 0, got -0.1"),
    ("sasrec", {"hidden": 16, "heads": 3}, "heads: hidden=16 does not split into 3 heads"),  # a torch view error
    ("sasrec", {"dropout": 1.0}, r"dropout: must be in \[0, 1\), got 1.0"),
    ("bert_lstm", {"seq_len": 0}, "seq_len: must be > 0, got 0"),
    ("bert_lstm", {"tune_layers": -1}, "tune_layers: must be >= 0, got -1"),
])
def test_baseline_configs_refuse_values_that_cannot_mean_anything(name, cfg, msg):
    """Each failed deep inside the fit (in torch, numpy or Python) instead of naming the key."""
    from llmrec.config import ConfigError

    with pytest.raises(ConfigError, match=rf"baselines\.{name}: {msg}"):
        get_model(name, **cfg)


def test_baseline_configs_keep_their_documented_zero_and_none_values():
    for name, cfg in (("mf", {"threads": 0, "time_budget_s": 0, "max_train_examples": 0, "patience": 0}),
                      ("bpr", {"valid_users": 0, "threads": None}), ("sasrec", {"dropout": 0.0, "weight_decay": 0}),
                      ("bert_lstm", {"max_valid_examples": None, "tune_layers": 0})):
        assert get_model(name, **cfg).cfg is not None


def test_popularity_serving_counts_every_event(models, tiny_dataset, tmp_path):
    """split="all" (serving: the user's every event is history, none is held out) scored with the train+valid
    counts, leaving out every user's last event; it now counts all events, also from a checkpoint saved before."""
    import torch

    inter = tiny_dataset.interactions
    want = np.bincount(inter["item_id"].map(tiny_dataset.item_index), minlength=tiny_dataset.n_items)
    u = tiny_dataset.targets("test")["user_id"].iloc[0]
    s = models["pop"].score_items([u], "all")[0]
    fin = np.isfinite(s)
    assert fin.sum() == tiny_dataset.n_items - len(tiny_dataset.history(u, before="all"))
    np.testing.assert_array_equal(s[fin], want[fin])
    path = models["pop"].save(tmp_path / "pop")
    state = torch.load(path / "state.pt", weights_only=False)
    del state["counts"]["all"]
    torch.save(state, path / "state.pt")
    old = get_model("pop").load(path, ds=tiny_dataset)
    np.testing.assert_array_equal(old.score_items([u], "all"), models["pop"].score_items([u], "all"))
    np.testing.assert_array_equal(old.score_items([u], "test"), models["pop"].score_items([u], "test"))
