"""BERT + LSTM baseline on the tiny dataset with the embedded MiniLM BertModel (offline, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.evaluation import evaluate_ranking, evaluate_yesno, yesno_subset

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_model(tiny_dataset, tmp_path_factory):
    from llmrec.baselines import get_model
    from llmrec.baselines.text import default_bert_path

    try:
        default_bert_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("bert_cache")
    m = get_model("bert_lstm", cache_dir=str(cache), epochs_yesno=15, epochs_next=30, patience=15, lr=0.005,
                  batch_size=64, seq_batch_size=8, seq_len=12, proj=32, hidden=32, eval_every_next=5)
    return m.fit(tiny_dataset, progress=False), cache


def test_item_embeddings_cached(bert_model, tiny_dataset):
    from llmrec.baselines.text import BertEncoder

    m, cache = bert_model
    files = list(cache.rglob("*.npy"))
    assert len(files) == 1
    enc = BertEncoder(cache_dir=cache)
    texts = tiny_dataset.item_texts()
    v = np.load(files[0])
    assert v.shape == (tiny_dataset.n_items, 384)
    # the cache holds what the encoder computes (mean pooling), keyed by the texts
    np.testing.assert_allclose(enc.encode_uncached(texts[:3], progress=False), v[:3], atol=1e-5)
    assert enc.cache_path(texts) == files[0]
    assert enc.cache_path(texts[::-1]) != files[0]


def test_bert_lstm_beats_random(bert_model, tiny_dataset):
    m, _ = bert_model
    ds = tiny_dataset
    ex = yesno_subset(ds, "test")
    assert evaluate_yesno(m.predict_proba(ex), ex)["auc"] > 0.65
    got = evaluate_ranking(ds, lambda u: m.score_items(list(u), "test"))["ndcg@10"]
    rnd = np.mean([evaluate_ranking(ds, lambda u, r=np.random.default_rng(s): r.random((len(u), ds.n_items)))
                   ["ndcg@10"] for s in range(20)])
    assert got > rnd + 0.05, (got, rnd)


def test_bert_lstm_excludes_history_and_roundtrips(bert_model, tiny_dataset, tmp_path):
    from llmrec.baselines import load_model

    m, _ = bert_model
    ds = tiny_dataset
    users = ds.targets("test")["user_id"].tolist()[:8]
    s = m.score_items(users, "test")
    for r, u in enumerate(users):
        seen = [ds.item_index[i] for i in ds.history(u, before="test")["item_id"]]
        assert np.all(np.isneginf(s[r, seen])) and np.isfinite(s[r]).sum() == ds.n_items - len(seen)
    loaded = load_model("bert_lstm", ds.name, path=str(m.save(tmp_path / "bl")), ds=ds)
    np.testing.assert_array_equal(loaded.score_items(users, "test"), s)
    ex = yesno_subset(ds, "test")
    np.testing.assert_array_equal(loaded.predict_proba(ex), m.predict_proba(ex))


def test_tune_top_layer_changes_only_top_layer(tiny_dataset, tmp_path):
    import torch

    from llmrec.baselines import get_model

    m = get_model("bert_lstm", cache_dir=str(tmp_path), tune_layers=1, tasks=["yesno"], epochs_yesno=1,
                  max_train_examples=64, batch_size=32, proj=16, hidden=16, bert_lr=1e-3)
    m.fit(tiny_dataset, progress=False)
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(m._encoder().path), local_files_only=True)
    tuned = m._encoder().model
    n = len(tuned.encoder.layer)
    assert not torch.equal(tuned.encoder.layer[n - 1].attention.self.query.weight,
                           ref.encoder.layer[n - 1].attention.self.query.weight)
    assert torch.equal(tuned.encoder.layer[0].attention.self.query.weight,
                       ref.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(tuned.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    # the item table used for prediction was re-encoded with the tuned layers
    assert not torch.allclose(m.E, m._base_E)
    with pytest.raises(RuntimeError, match="next-item head"):
        m.score_items(tiny_dataset.targets("test")["user_id"].tolist()[:2])


def test_bert_lstm_scores_an_arbitrary_history_like_a_known_user(bert_model, tiny_dataset):
    """BERT+LSTM's `score_history` reads the same events (ids and likes) as a known user's `_score`; a changed like
    label changes the scores (the model sees reactions); unknown ids are skipped; liked unknown counts as liked."""
    m, _ = bert_model
    u = tiny_dataset.targets("test")["user_id"].iloc[0]
    items, labs = m.history_of(u, "test")
    assert 0 < labs.sum() < len(labs), "the tiny user needs both likes and dislikes for this test"
    events = [(tiny_dataset.item_ids[i], bool(lab), 0) for i, lab in zip(items, labs)]
    want = m._score([u], "test")[0]
    np.testing.assert_allclose(m.score_history(events + [("no-such-item", True, 0)]), want, rtol=1e-5, atol=1e-5)
    flipped = [(i, not lab, t) for i, lab, t in events]
    assert not np.allclose(m.score_history(flipped), want)
    all_liked = m.score_history([(i, True, 0) for i, _, _ in events])
    np.testing.assert_allclose(m.score_history([i for i, _, _ in events]), all_liked, rtol=1e-6)
    np.testing.assert_allclose(m.score_history([(i, None) for i, _, _ in events]), all_liked, rtol=1e-6)


def test_bert_lstm_alone_as_the_retriever_ranks_as_bert_lstm(bert_model, tiny_dataset):
    from test_baselines import assert_retriever_ranks_as

    assert_retriever_ranks_as(tiny_dataset, bert_model[0], "bert_lstm")


def test_tuned_encoder_is_refused_for_both_tasks_at_once(tiny_dataset, tmp_path):
    """One encoder tuned by both tasks would leak across the two splits: the Yes/No head would score with item vectors
    tuned on the leave-one-out train sequences (they hold most time-split test events), and the next-item task would
    start from an encoder tuned on Yes/No rows that hold leave-one-out test targets with their labels."""
    from llmrec.baselines import get_model

    m = get_model("bert_lstm", cache_dir=str(tmp_path), tune_layers=1, tasks=["yesno", "next"])
    with pytest.raises(ValueError, match="tune_layers.*one task"):
        m.fit(tiny_dataset, progress=False)


def test_yesno_head_early_stops_on_the_training_loss_when_the_valid_rows_hold_one_class(tiny_dataset, tmp_path):
    """One valid row has one class: its NaN AUC never beat the first epoch's, so the first epoch was kept (see the
    MF test in test_baselines_audit). The Yes/No head now early-stops on the training loss and records it."""
    from llmrec.baselines import get_model
    from llmrec.baselines.text import default_bert_path

    try:
        default_bert_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    m = get_model("bert_lstm", cache_dir=str(tmp_path), tasks=["yesno"], epochs_yesno=4, patience=2, lr=0.005,
                  batch_size=64, proj=16, hidden=16, max_valid_examples=1).fit(tiny_dataset, progress=False)
    assert m.fit_info["yesno_valid_auc"] is None
    assert m.fit_info["yesno_early_stopping"].startswith("training loss: the 1 valid Yes/No rows all have label")
    assert m.fit_info["yesno_best_epoch"] == m.fit_info["yesno_epochs"] == 4
