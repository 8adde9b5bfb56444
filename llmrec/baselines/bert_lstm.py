"""BERT + LSTM + fully connected click / next-item model.

Each history item's text (`ds.item_text`: title, genres/categories, year/description) is encoded by a BERT encoder
(`llmrec.baselines.text.BertEncoder`, mean pooling; frozen by default, item embeddings cached; `tune_layers=k`
fine-tunes its top k layers). The sequence of projected item vectors, each concatenated with a like/dislike
embedding, goes through an LSTM; then a fully connected head:

- Yes/No (`predict_proba`): MLP on [h, t, h * t] (h: LSTM state, t: projected target item) -> sigmoid; BCE on the
  Yes/No `train` rows (history = their <= 10 preceding events), early stopping on the `valid` rows' AUC.
- next item (`score_items`): FC(h_t) . t_i + b_i for every item i (full ranking), softmax cross-entropy over all items
  at every position of the leave-one-out `train` sequences, early stopping on valid NDCG@10. With `tune_layers > 0`
  the softmax runs over the batch's items plus `neg_samples` random items (encoding the catalogue at every step is
  too slow on CPU); after training the catalogue is re-encoded once with the tuned encoder. A tuned encoder serves
  one task per model (each task's training data holds the other's test events).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llmrec.baselines.base import (
    Baseline,
    EarlyStopper,
    TimeBudget,
    check_values,
    yesno_arrays,
    yesno_stopping_rule,
    yesno_train_valid,
)

log = logging.getLogger(__name__)


@dataclass
class BertLSTMConfig:
    model_path: str | None = None  # local BERT folder; default: the embedded all-MiniLM-L6-v2
    tune_layers: int = 0  # 0 = frozen encoder (cached embeddings); k = fine-tune the top k layers
    max_text_len: int = 64
    text_fields: list[str] | None = None  # default: the dataset's text fields
    proj: int = 128
    hidden: int = 128
    like_dim: int = 16
    dropout: float = 0.2
    hist_len: int = 10  # Yes/No history (the prepared examples hold <= 10 events)
    seq_len: int = 50  # next-item input length
    tasks: list[str] = field(default_factory=lambda: ["yesno", "next"])
    lr: float = 0.001
    bert_lr: float = 2e-5
    batch_size: int = 256
    seq_batch_size: int = 64
    epochs_yesno: int = 20
    epochs_next: int = 60
    patience: int = 3
    eval_every_next: int = 2
    valid_users: int = 1000
    max_train_examples: int | None = None  # seeded cap on the Yes/No training rows (large datasets)
    max_valid_examples: int | None = 20000  # seeded cap on the Yes/No valid rows used for early stopping
    valid_seed: int | None = None  # seed of that cap (None: `seed`; a recipe's data.eval_seed to match its rows)
    neg_samples: int = 512
    seed: int = 0
    threads: int | None = 1
    time_budget_s: float | None = None  # per task
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_values(self, positive=("max_text_len", "proj", "hidden", "like_dim", "hist_len", "seq_len", "lr",
                                     "bert_lr", "batch_size", "seq_batch_size", "epochs_yesno", "epochs_next",
                                     "eval_every_next", "neg_samples"),
                     non_negative=("tune_layers", "patience", "valid_users", "max_train_examples",
                                   "max_valid_examples", "threads", "time_budget_s"),
                     fraction=("dropout",))


def _make_net(d_text: int, n_items: int, c: BertLSTMConfig, task: str) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(d_text, c.proj)
            self.like = nn.Embedding(3, c.like_dim)  # 0 pad / unknown, 1 like, 2 dislike
            self.lstm = nn.LSTM(c.proj + c.like_dim, c.hidden, batch_first=True)
            self.drop = nn.Dropout(c.dropout)
            if task == "yesno":
                self.head = nn.Sequential(nn.Linear(c.hidden + 2 * c.proj, c.hidden), nn.ReLU(), nn.Dropout(c.dropout),
                                          nn.Linear(c.hidden, 1))
            else:
                self.fc = nn.Linear(c.hidden, c.proj)
                self.bias = nn.Parameter(torch.zeros(n_items))

        def encode_seq(self, vecs: Any, likes: Any) -> Any:
            """vecs [B, L, d_text] (zeros at pads), likes [B, L] -> LSTM outputs [B, L, hidden]."""
            x = torch.cat([self.proj(vecs), self.like(likes)], -1) * (likes > 0).unsqueeze(-1)
            return self.lstm(self.drop(x))[0]

        def yesno_logit(self, vecs: Any, likes: Any, target: Any) -> Any:
            h = self.encode_seq(vecs, likes)[:, -1]
            t = self.proj(target)
            hp = h[:, : c.proj] if c.hidden >= c.proj else nn.functional.pad(h, (0, c.proj - c.hidden))
            return self.head(torch.cat([h, t, hp * t], -1)).squeeze(-1)

        def next_logits(self, h: Any, item_vecs: Any, item_idx: Any | None = None) -> Any:
            b = self.bias if item_idx is None else self.bias[item_idx]
            return self.fc(self.drop(h)) @ self.proj(item_vecs).T + b

    return Net()


class BertLSTM(Baseline):
    name = "bert_lstm"
    config_cls = BertLSTMConfig
    yesno = True

    # ------------------------------------------------------------------ text
    def _texts(self) -> list[str]:
        return self.ds.item_texts(self.cfg.text_fields)

    def _encoder(self) -> Any:
        from llmrec.baselines.text import BertEncoder

        if getattr(self, "_enc", None) is None:
            self._enc = BertEncoder(self.cfg.model_path, self.cfg.max_text_len, cache_dir=self.cfg.cache_dir)
        return self._enc

    def _setup_tuning(self) -> list[Any]:
        """Unfreeze the top `tune_layers` BERT layers; returns their parameters."""
        enc = self._encoder()
        model = enc.model
        for p in model.parameters():
            p.requires_grad_(False)
        layers = model.encoder.layer
        k = self.cfg.tune_layers
        if k > len(layers):
            raise ValueError(f"tune_layers={k} but the encoder has {len(layers)} layers")
        params = [p for lay in layers[len(layers) - k :] for p in lay.parameters()]
        for p in params:
            p.requires_grad_(True)
        toks = enc.tokenize(self._texts())
        self._tok_ids, self._tok_mask = toks["input_ids"], toks["attention_mask"]
        return params

    def _item_vecs(self, idx: Any) -> Any:
        """Text vectors of item indices `idx` (1-D LongTensor): cached table, or tuned encoder with gradients."""
        if self.cfg.tune_layers == 0:
            return self.E[idx]
        ids, mask = self._tok_ids[idx], self._tok_mask[idx]
        n = int(mask.sum(1).max())
        self._encoder().model.train()
        return self._encoder().forward(ids[:, :n], mask[:, :n])

    def _refresh_table(self) -> None:
        import torch

        if self.cfg.tune_layers:
            self._encoder().model.eval()
            self.E = torch.as_tensor(self._encoder().encode_uncached(self._texts(), progress=False))

    def _batch_vecs(self, hist: Any, extra: Any) -> tuple[Any, Any]:
        """Vectors for a batch: history [B, L] (index+1, 0 pad) and extra item indices [M] -> ([B, L, d], [M, d])."""
        import torch

        if self.cfg.tune_layers == 0:
            table = torch.cat([torch.zeros(1, self.E.shape[1]), self.E])
            return table[hist], self.E[extra]
        uniq, inv = torch.unique(torch.cat([hist.reshape(-1), extra + 1]), return_inverse=True)
        vec = self._item_vecs((uniq - 1).clamp(min=0)) * (uniq > 0).unsqueeze(-1)
        h = vec[inv[: hist.numel()]].reshape(*hist.shape, -1)
        return h, vec[inv[hist.numel() :]]

    # ------------------------------------------------------------------ fit
    def _fit(self, ds: Any, progress: bool = True) -> None:
        import torch

        c: BertLSTMConfig = self.cfg
        unknown = set(c.tasks) - {"yesno", "next"}
        if unknown or not c.tasks:
            raise ValueError(f"bert_lstm.tasks: {sorted(unknown) or c.tasks} not in ['yesno', 'next']")
        if c.tune_layers and len(set(c.tasks)) > 1:
            # one tuned encoder would carry each task's training data into the other's evaluation: the Yes/No rows
            # before t_valid hold leave-one-out test targets (with labels), the leave-one-out train sequences hold
            # most Yes/No test events
            raise ValueError("bert_lstm: tune_layers > 0 tunes the encoder shared by both tasks, which leaks each "
                             "task's training data into the other's test; fit one task per model (tasks=[yesno] / "
                             "tasks=[next])")
        enc = self._encoder()
        t0 = time.perf_counter()
        self.E = torch.as_tensor(enc.encode(self._texts(), progress=progress))
        self.fit_info["encode_s"] = time.perf_counter() - t0
        self.fit_info["encoder"] = str(enc.path)
        self.nets: dict[str, Any] = {}
        self._base_E = self.E.clone()
        if "yesno" in c.tasks:
            self._fit_yesno(ds, progress)
        if "next" in c.tasks:
            self._fit_next(ds, progress)
        self._refresh_table()

    def _optim(self, net: Any) -> Any:
        import torch

        groups = [{"params": list(net.parameters()), "lr": self.cfg.lr}]
        if self.cfg.tune_layers:
            groups.append({"params": self._setup_tuning(), "lr": self.cfg.bert_lr})
        return torch.optim.Adam(groups)

    def _snapshot(self, net: Any) -> dict[str, Any]:
        s = {"net": net.state_dict()}
        if self.cfg.tune_layers:
            s["bert"] = self._encoder().model.state_dict()
        return s

    def _restore(self, net: Any, snap: dict[str, Any]) -> None:
        net.load_state_dict(snap["net"])
        if "bert" in snap:
            self._encoder().model.load_state_dict(snap["bert"])

    def _fit_yesno(self, ds: Any, progress: bool) -> None:
        import torch
        import torch.nn.functional as F

        from llmrec.metrics import auc

        c = self.cfg
        tr, va = yesno_train_valid(ds, c.max_train_examples, c.max_valid_examples, c.seed, c.valid_seed)
        if tr.empty:
            raise ValueError(f"{ds.name}: no Yes/No training rows")
        a = yesno_arrays(ds, tr, c.hist_len)
        hi, hl = torch.as_tensor(a["hist_items"]), torch.as_tensor(a["hist_likes"])
        it, lab = torch.as_tensor(a["items"]), torch.as_tensor(a["labels"])
        net = _make_net(self.E.shape[1], ds.n_items, c, "yesno")
        self.nets["yesno"] = net
        opt = self._optim(net)
        stop = EarlyStopper(c.patience)
        gen = torch.Generator().manual_seed(c.seed)
        t0 = time.perf_counter()
        budget = TimeBudget(c.time_budget_s)
        fallback = yesno_stopping_rule(va, "bert_lstm yes/no")
        bar = tqdm(range(c.epochs_yesno), desc="bert_lstm yes/no", disable=not progress)
        for ep in bar:
            net.train()
            perm = torch.randperm(len(it), generator=gen)
            tot = 0.0
            for b in range(0, len(it), c.batch_size):
                k = perm[b : b + c.batch_size]
                hv, tv = self._batch_vecs(hi[k], it[k])
                loss = F.binary_cross_entropy_with_logits(net.yesno_logit(hv, hl[k], tv), lab[k])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(k)
            self._refresh_table()
            v_auc = -tot if fallback else auc(va["label"].to_numpy(), self.predict_proba(va))
            bar.set_postfix(loss=f"{tot / len(it):.4f}", valid_auc=f"{v_auc:.4f}")
            if stop.step(v_auc, self._snapshot(net), ep):
                break
            if budget.epoch_done():
                self.fit_info["yesno_stopped_by_time_budget"] = True
                break
        self._restore(net, stop.best_state)
        self._refresh_table()
        self.fit_info.update({"yesno_epochs": ep + 1, "yesno_best_epoch": stop.best_epoch + 1,
                              "yesno_valid_auc": None if fallback else stop.best, "yesno_train_rows": len(tr),
                              "yesno_train_s": time.perf_counter() - t0})
        if fallback:
            self.fit_info["yesno_early_stopping"] = f"training loss: {fallback}"

    def _fit_next(self, ds: Any, progress: bool) -> None:
        import torch
        import torch.nn.functional as F

        c = self.cfg
        seqs = [(i, lab) for i, lab in self.histories("valid").values() if len(i) >= 2]
        if not seqs:
            raise ValueError(f"{ds.name}: no user has 2 training events")
        n = c.seq_len
        inp = np.zeros((len(seqs), n), np.int64)
        lk = np.zeros((len(seqs), n), np.int64)
        tgt = np.zeros((len(seqs), n), np.int64)
        for r, (items, labs) in enumerate(seqs):
            x, lx, yy = items[:-1][-n:], labs[:-1][-n:], items[1:][-n:]
            inp[r, n - len(x) :] = x + 1
            lk[r, n - len(x) :] = np.where(lx > 0, 1, 2)
            tgt[r, n - len(x) :] = yy + 1
        inp_t, lk_t, tgt_t = torch.as_tensor(inp), torch.as_tensor(lk), torch.as_tensor(tgt)
        net = _make_net(self.E.shape[1], ds.n_items, c, "next")
        self.nets["next"] = net
        opt = self._optim(net)
        stop = EarlyStopper(c.patience)
        gen = torch.Generator().manual_seed(c.seed + 1)
        t0 = time.perf_counter()
        budget = TimeBudget(c.time_budget_s)
        bar = tqdm(range(c.epochs_next), desc="bert_lstm next", disable=not progress)
        all_idx = torch.arange(ds.n_items)
        for ep in bar:
            net.train()
            perm = torch.randperm(len(inp_t), generator=gen)
            tot, cnt = 0.0, 0
            for b in range(0, len(inp_t), c.seq_batch_size):
                k = perm[b : b + c.seq_batch_size]
                x, lx, yy = inp_t[k], lk_t[k], tgt_t[k]
                keep = yy > 0
                if c.tune_layers == 0:
                    hv, iv = self._batch_vecs(x, all_idx)
                    h = net.encode_seq(hv, lx)[keep]
                    logits, labels = net.next_logits(h, iv), yy[keep] - 1
                else:
                    neg = torch.randint(0, ds.n_items, (c.neg_samples,), generator=gen)
                    cand, labels = torch.unique(torch.cat([yy[keep] - 1, neg]), return_inverse=True)
                    labels = labels[: int(keep.sum())]
                    hv, iv = self._batch_vecs(x, cand)
                    h = net.encode_seq(hv, lx)[keep]
                    logits = net.next_logits(h, iv, cand)
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(labels)
                cnt += len(labels)
            over = budget.epoch_done()
            if (ep + 1) % c.eval_every_next == 0 or ep + 1 == c.epochs_next or over:
                self._refresh_table()
                m = self.valid_ranking(c.valid_users or None, c.seed)
                bar.set_postfix(loss=f"{tot / max(1, cnt):.4f}", valid_ndcg10=f"{m['ndcg@10']:.4f}")
                if stop.step(m["ndcg@10"], self._snapshot(net), ep):
                    break
            if over:
                self.fit_info["next_stopped_by_time_budget"] = True
                break
        self._restore(net, stop.best_state)
        self.fit_info.update({"next_epochs": ep + 1, "next_best_epoch": stop.best_epoch + 1,
                              "next_valid_ndcg@10": stop.best, "next_train_s": time.perf_counter() - t0})

    # ------------------------------------------------------------------ predict
    def predict_proba(self, examples: pd.DataFrame) -> np.ndarray:
        import torch

        if self.ds is None or "yesno" not in getattr(self, "nets", {}):
            raise RuntimeError("bert_lstm: the Yes/No head is not trained (fit with tasks including 'yesno')")
        net = self.nets["yesno"]
        net.eval()
        a = yesno_arrays(self.ds, examples, self.cfg.hist_len)
        table = torch.cat([torch.zeros(1, self.E.shape[1]), self.E])
        out = []
        with torch.no_grad():
            for b in range(0, len(examples), 4096):
                s = slice(b, b + 4096)
                hv = table[torch.as_tensor(a["hist_items"][s])]
                lg = net.yesno_logit(hv, torch.as_tensor(a["hist_likes"][s]), self.E[torch.as_tensor(a["items"][s])])
                out.append(torch.sigmoid(lg).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def _score(self, user_ids: list[str], split: str) -> np.ndarray:
        return self._next_scores([self.history_of(u, split) for u in user_ids])

    def _next_scores(self, hists: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """[len(hists), n_items] next-item logits after each (item indices, like labels) history, oldest first."""
        import torch

        if "next" not in getattr(self, "nets", {}):
            raise RuntimeError("bert_lstm: the next-item head is not trained (fit with tasks including 'next')")
        net = self.nets["next"]
        net.eval()
        n = self.cfg.seq_len
        x = np.zeros((len(hists), n), np.int64)
        lk = np.zeros((len(hists), n), np.int64)
        for r, (items, labs) in enumerate(hists):
            items, labs = items[-n:], labs[-n:]
            if len(items):
                x[r, n - len(items) :] = items + 1
                lk[r, n - len(items) :] = np.where(labs > 0, 1, 2)
        table = torch.cat([torch.zeros(1, self.E.shape[1]), self.E])
        with torch.no_grad():
            h = net.encode_seq(table[torch.as_tensor(x)], torch.as_tensor(lk))[:, -1]
            return net.next_logits(h, self.E).numpy()

    def score_history(self, history: Any) -> np.ndarray:
        """[n_items] next-item scores after an arbitrary history of (item_id, liked, ...) tuples or item ids,
        oldest first; unknown items are skipped; unmasked (the caller excludes what it must). Lets BERT+LSTM be the
        collaborative side of a retriever for users outside the training data (the event store)."""
        if self.ds is None:
            raise RuntimeError(f"{self.name}: call fit(ds) or load(path) first")
        # liked unknown (None): counted as liked, as a plain view or click; any false flag (False, numpy False, 0 as
        # stored in `interactions.label`) is a dislike, as `_score` reads it
        rows = [(h[0], len(h) < 2 or h[1] is None or bool(h[1])) if isinstance(h, (tuple, list)) else (h, True)
                for h in history]
        rows = [(self.ds.item_index[str(i)], lab) for i, lab in rows if str(i) in self.ds.item_index]
        items = np.array([i for i, _ in rows], dtype=np.int64)
        labs = np.array([int(lab) for _, lab in rows], dtype=np.int64)
        return self._next_scores([(items, labs)])[0].astype(np.float64)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"nets": {k: v.state_dict() for k, v in self.nets.items()}, "E": self.E}
        if self.cfg.tune_layers:
            s["bert"] = self._encoder().model.state_dict()
        return s

    def _set_state(self, state: dict[str, Any]) -> None:
        self.E = state["E"]
        self.nets = {}
        for task, sd in state["nets"].items():
            net = _make_net(self.E.shape[1], self.ds.n_items, self.cfg, task)
            net.load_state_dict(sd)
            net.eval()
            self.nets[task] = net
        self._enc = None
        if "bert" in state:
            self._encoder().model.load_state_dict(state["bert"])
