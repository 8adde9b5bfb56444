"""Popularity, matrix factorization (BCE on Yes/No, the classic click model) and BPR-MF (implicit next item)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llmrec.baselines.base import (
    SPLIT_HISTORY,
    Baseline,
    EarlyStopper,
    TimeBudget,
    check_values,
    yesno_stopping_rule,
    yesno_train_valid,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- popularity
@dataclass
class PopConfig:
    seed: int = 0


class Popularity(Baseline):
    """Score = number of interactions of the item among the events available before the target: `train` events for
    the valid split, `train`+`valid` events for the test split, every event for `all` (serving: no target is held
    out) (all users). Same ranking for every user, minus their own history."""

    name = "pop"
    config_cls = PopConfig

    def _fit(self, ds: Any, progress: bool = True) -> None:
        self.counts: dict[str, np.ndarray] = {}
        for split in ("valid", "test", "all"):
            self.counts[split] = self._count(ds, split)

    @staticmethod
    def _count(ds: Any, split: str) -> np.ndarray:
        inter = ds.interactions
        idx = inter.loc[inter["split"].isin(SPLIT_HISTORY[split]), "item_id"].map(ds.item_index).to_numpy(np.int64)
        return np.bincount(idx, minlength=ds.n_items).astype(np.float64)

    def _score(self, user_ids: list[str], split: str) -> np.ndarray:
        return np.tile(self.counts[split], (len(user_ids), 1))

    def _state(self) -> dict[str, Any]:
        return {"counts": self.counts}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.counts = dict(state["counts"])
        if "all" not in self.counts:  # a checkpoint from before `all` was counted (it served the test counts)
            self.counts["all"] = self._count(self.ds, "all")


# ------------------------------------------------------------------------------------------- MF (BCE, Yes/No)
@dataclass
class MFConfig:
    dim: int = 32
    lr: float = 0.005
    l2: float = 1e-4  # l2 * batch mean of |p_u|^2 + |q_i|^2 (the embeddings only: the biases are not regularised)
    epochs: int = 30
    batch_size: int = 4096
    patience: int = 3  # epochs without a better valid AUC
    seed: int = 0
    threads: int | None = 1  # 2 threads on 2 busy shared cores was 70x slower (OpenMP spinning)
    time_budget_s: float | None = None
    max_train_examples: int | None = None  # seeded cap on the Yes/No training rows (few-shot comparisons)
    max_valid_examples: int | None = None  # seeded cap on the Yes/No valid rows used for early stopping
    valid_seed: int | None = None  # seed of that cap (None: `seed`; a recipe's data.eval_seed to match its rows)

    def __post_init__(self) -> None:
        check_values(self, positive=("dim", "lr", "epochs", "batch_size"),
                     non_negative=("l2", "patience", "threads", "time_budget_s", "max_train_examples",
                                   "max_valid_examples"))


class _MFNet:
    """Built lazily so that importing this module does not import torch."""

    @staticmethod
    def make(n_users: int, n_items: int, dim: int) -> Any:
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.P = nn.Embedding(n_users + 1, dim)  # row n_users = unknown user (zeros)
                self.Q = nn.Embedding(n_items, dim)
                self.bu = nn.Embedding(n_users + 1, 1)
                self.bi = nn.Embedding(n_items, 1)
                self.b0 = nn.Parameter(torch.zeros(1))
                for e in (self.P, self.Q):
                    nn.init.normal_(e.weight, std=0.05)
                for e in (self.bu, self.bi):
                    nn.init.zeros_(e.weight)

            def forward(self, u: Any, i: Any) -> Any:
                p, q = self.P(u), self.Q(i)
                return (p * q).sum(-1) + self.bu(u).squeeze(-1) + self.bi(i).squeeze(-1) + self.b0, p, q

        return Net()


class _MFNetModel:
    """What the two models on an `_MFNet` share: next-item scores p_u . q_i + b_i, and the checkpoint state."""

    net: Any
    user_index: dict[str, int]

    def _net_scores(self, uidx: np.ndarray, net: Any = None) -> np.ndarray:
        import torch

        net = self.net if net is None else net
        net.eval()
        with torch.no_grad():
            s = net.P(torch.as_tensor(uidx)) @ net.Q.weight.T + net.bi.weight.T
        return s.numpy()

    def _state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "user_index": self.user_index}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.user_index = state["user_index"]
        self.net = _MFNet.make(len(self.user_index), self.ds.n_items, self.cfg.dim)  # type: ignore[attr-defined]
        self.net.load_state_dict(state["net"])


def _user_rows(users: Any, user_index: dict[str, int]) -> np.ndarray:
    """Each user's row in an MF net's P / bu; users without a training row get the zeroed row len(user_index)."""
    n_u = len(user_index)
    return np.array([user_index.get(str(x), n_u) for x in users], dtype=np.int64)


class MatrixFactorization(_MFNetModel, Baseline):
    """Classic click model: P(like | u, i) = sigmoid(p_u . q_i + b_u + b_i + b), binary cross-entropy on the Yes/No
    `train` rows, early stopping on the `valid` rows' AUC. Users without a training row (cold) get p_u = 0, b_u = 0:
    only the item bias and the global bias. For next-item ranking, items are ranked by p_u . q_i + b_i of a second
    net fitted the same way on those rows minus every leave-one-out valid/test event: the time-split `train` rows
    hold the leave-one-out targets of users whose last events precede `t_valid` (642 of 943 test targets on ML-100K),
    and a net fitted on them ranks a liked target up and a disliked one down from its own label."""

    name = "mf"
    config_cls = MFConfig
    yesno = True

    rank_net: Any = None
    rank_user_index: dict[str, int] | None = None

    def _fit(self, ds: Any, progress: bool = True) -> None:
        c: MFConfig = self.cfg
        tr, va = yesno_train_valid(ds, c.max_train_examples, c.max_valid_examples, c.seed, c.valid_seed)
        if tr.empty:
            raise ValueError(f"{ds.name}: no Yes/No training rows")
        self.net, self.user_index, info = self._train(ds, tr, va, progress, "mf")
        self.fit_info.update(info)
        inter = ds.interactions
        held = inter[inter["split"] != "train"]
        held = set(zip(held["user_id"].astype(str), held["item_id"].astype(str)))

        def keep(df: pd.DataFrame) -> pd.DataFrame:
            return df[[(u, i) not in held for u, i in zip(df["user_id"].astype(str), df["item_id"].astype(str))]]

        rtr, rva = keep(tr), keep(va)
        if rtr.empty:
            raise ValueError(f"{ds.name}: every Yes/No training row is a leave-one-out valid/test event")
        self.rank_net, self.rank_user_index, rinfo = self._train(ds, rtr, rva, progress, "mf (ranking)")
        self.fit_info.update({f"rank_{k}": v for k, v in rinfo.items()})
        self.fit_info["rank_rows_dropped"] = len(tr) - len(rtr)

    def _train(self, ds: Any, tr: pd.DataFrame, va: pd.DataFrame, progress: bool,
               desc: str) -> tuple[Any, dict[str, int], dict[str, Any]]:
        """(net, user index, fit info) of one MF fit on Yes/No rows `tr`, early-stopped on `va`'s AUC."""
        import torch

        from llmrec.metrics import auc

        c: MFConfig = self.cfg
        info: dict[str, Any] = {}
        user_index = {u: n for n, u in enumerate(sorted(tr["user_id"].astype(str).unique()))}
        n_u = len(user_index)
        net = _MFNet.make(n_u, ds.n_items, c.dim)
        u = torch.as_tensor(_user_rows(tr["user_id"], user_index))
        i = torch.as_tensor(tr["item_id"].map(ds.item_index).to_numpy(np.int64).copy())
        lab = torch.as_tensor(tr["label"].to_numpy(np.float32))
        opt = torch.optim.Adam(net.parameters(), lr=c.lr)
        stop = EarlyStopper(c.patience)
        gen = torch.Generator().manual_seed(c.seed)
        budget = TimeBudget(c.time_budget_s)
        fallback = yesno_stopping_rule(va, desc)
        bar = tqdm(range(c.epochs), desc=desc, disable=not progress)
        for ep in bar:
            net.train()
            perm = torch.randperm(len(u), generator=gen)
            tot = 0.0
            for b in range(0, len(u), c.batch_size):
                j = perm[b : b + c.batch_size]
                logit, p, q = net(u[j], i[j])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, lab[j])
                reg = c.l2 * ((p**2).sum(-1) + (q**2).sum(-1)).mean()
                opt.zero_grad()
                (loss + reg).backward()
                opt.step()
                with torch.no_grad():
                    net.P.weight[n_u].zero_()
                    net.bu.weight[n_u].zero_()
                tot += float(loss.detach()) * len(j)
            v_auc = -float(tot) if fallback else auc(va["label"].to_numpy(), self._proba(net, user_index, va))
            bar.set_postfix(loss=f"{tot / len(u):.4f}", valid_auc=f"{v_auc:.4f}")
            if stop.step(v_auc, net.state_dict(), ep):
                break
            if budget.epoch_done():
                info["stopped_by_time_budget"] = True
                break
        net.load_state_dict(stop.best_state)
        info.update({"epochs": ep + 1, "best_epoch": stop.best_epoch + 1,
                     "valid_auc": None if fallback else stop.best, "train_rows": len(tr),
                     "users_with_training_rows": n_u})
        if fallback:
            info["early_stopping"] = f"training loss: {fallback}"
        return net, user_index, info

    def predict_proba(self, examples: pd.DataFrame) -> np.ndarray:
        if self.ds is None:
            raise RuntimeError("mf: call fit(ds) or load(path) first")
        return self._proba(self.net, self.user_index, examples)

    def _proba(self, net: Any, user_index: dict[str, int], examples: pd.DataFrame) -> np.ndarray:
        import torch

        u = torch.as_tensor(_user_rows(examples["user_id"], user_index))
        i = torch.as_tensor(examples["item_id"].map(self.ds.item_index).to_numpy(np.int64).copy())
        net.eval()
        with torch.no_grad():
            return torch.sigmoid(net(u, i)[0]).numpy().astype(np.float64)

    def cold_share(self, examples: pd.DataFrame) -> float:
        """Share of `examples` whose user has no training row (scored by biases only)."""
        cold = _user_rows(examples["user_id"], self.user_index) == len(self.user_index)
        return float(np.mean(cold)) if len(examples) else 0.0

    def _score(self, user_ids: list[str], split: str) -> np.ndarray:
        if self.rank_net is None or self.rank_user_index is None:
            raise RuntimeError("mf: call fit(ds) or load(path) first")
        return self._net_scores(_user_rows(user_ids, self.rank_user_index), self.rank_net)

    def _state(self) -> dict[str, Any]:
        out = super()._state()
        if self.rank_net is not None:
            out.update(rank_net=self.rank_net.state_dict(), rank_user_index=self.rank_user_index)
        return out

    def _set_state(self, state: dict[str, Any]) -> None:
        if state.get("rank_user_index") is None:  # ValueError: `load_or_fit` fits such a checkpoint again
            raise ValueError("mf: checkpoint written before MF's ranking net left out the leave-one-out valid/test "
                             "events (its ranking saw them); refit it: llmrec baselines train --model mf")
        super()._set_state(state)
        self.rank_user_index = state["rank_user_index"]
        self.rank_net = _MFNet.make(len(self.rank_user_index), self.ds.n_items, self.cfg.dim)
        self.rank_net.load_state_dict(state["rank_net"])


# --------------------------------------------------------------------------------------------------- BPR-MF
@dataclass
class BPRConfig:
    dim: int = 64
    lr: float = 0.002
    l2: float = 1e-4
    epochs: int = 60
    batch_size: int = 4096
    eval_every: int = 2
    patience: int = 4  # evaluations without a better valid NDCG@10
    valid_users: int = 1000  # seeded subset of users for early stopping (0 = all)
    seed: int = 0
    threads: int | None = 1  # 2 threads on 2 busy shared cores was 70x slower (OpenMP spinning)
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        check_values(self, positive=("dim", "lr", "epochs", "batch_size", "eval_every"),
                     non_negative=("l2", "patience", "valid_users", "threads", "time_budget_s"))


def _bpr_negatives(u: np.ndarray, seen: set[int], n_items: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform negative per positive row of user `u[r]`: an item whose key `user * n_items + item` is not in
    `seen`. Collisions are redrawn; a row still colliding after 20 rounds (a very dense user) gets one drawn from
    that user's explicit complement. The caller leaves out users with no unseen item."""
    neg = rng.integers(0, n_items, size=len(u))
    for _ in range(20):
        bad = np.flatnonzero(np.fromiter(((a * n_items + b) in seen for a, b in zip(u, neg)), bool, len(u)))
        if not bad.size:
            return neg
        neg[bad] = rng.integers(0, n_items, size=bad.size)
    for r in np.flatnonzero(np.fromiter(((a * n_items + b) in seen for a, b in zip(u, neg)), bool, len(u))):
        free = [j for j in range(n_items) if u[r] * n_items + j not in seen]
        if not free:
            raise ValueError(f"bpr: user row {u[r]} has every item in `train`, so no negative exists for it")
        neg[r] = free[int(rng.integers(0, len(free)))]
    return neg


class BPRMF(_MFNetModel, Baseline):
    """BPR-MF (Rendle et al. 2009) on implicit feedback: every `train` event (liked or not) is a positive, one uniform
    negative per positive (an item the user never had in `train`, redrawn until it is one), loss
    -log sigmoid(s_ui - s_uj) + l2 * batch mean of |p_u|^2 + |q_i|^2 + |q_j|^2 (the item biases are not regularised).
    Score = p_u . q_i + b_i. Early stopping on valid full-ranking NDCG@10."""

    name = "bpr"
    config_cls = BPRConfig

    def _fit(self, ds: Any, progress: bool = True) -> None:
        import torch

        c: BPRConfig = self.cfg
        tr = ds.interactions[ds.interactions["split"] == "train"]
        self.user_index = {u: n for n, u in enumerate(ds.user_ids.astype(str))}
        n_u = len(self.user_index)
        self.net = _MFNet.make(n_u, ds.n_items, c.dim)
        u = tr["user_id"].astype(str).map(self.user_index).to_numpy(np.int64)
        i = tr["item_id"].map(ds.item_index).to_numpy(np.int64)
        seen = set((u * ds.n_items + i).tolist())
        full = np.bincount(u, minlength=n_u) >= ds.n_items  # users with no unseen item: no BPR pair exists
        if full.any():
            u, i = u[~full[u]], i[~full[u]]
            self.fit_info["users_without_negatives"] = int(full.sum())
        if not len(u):
            raise ValueError(f"{ds.name}: no training event has an unseen item to contrast with; BPR cannot train")
        rng = np.random.default_rng(c.seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        stop = EarlyStopper(c.patience)
        budget = TimeBudget(c.time_budget_s)
        bar = tqdm(range(c.epochs), desc="bpr", disable=not progress)
        ut, it = torch.from_numpy(u.copy()), torch.from_numpy(i.copy())
        for ep in bar:
            self.net.train()
            neg = _bpr_negatives(u, seen, ds.n_items, rng)
            jt = torch.as_tensor(neg)
            perm = torch.as_tensor(rng.permutation(len(u)))
            tot = 0.0
            for b in range(0, len(u), c.batch_size):
                k = perm[b : b + c.batch_size]
                uu, ii, jj = ut[k], it[k], jt[k]
                p, qi, qj = self.net.P(uu), self.net.Q(ii), self.net.Q(jj)
                x = (p * (qi - qj)).sum(-1) + self.net.bi(ii).squeeze(-1) - self.net.bi(jj).squeeze(-1)
                loss = -torch.nn.functional.logsigmoid(x).mean()
                reg = c.l2 * ((p**2).sum(-1) + (qi**2).sum(-1) + (qj**2).sum(-1)).mean()
                opt.zero_grad()
                (loss + reg).backward()
                opt.step()
                tot += float(loss.detach()) * len(k)
            if (ep + 1) % c.eval_every == 0 or ep + 1 == c.epochs:
                m = self.valid_ranking(c.valid_users or None, c.seed)
                bar.set_postfix(loss=f"{tot / len(u):.4f}", valid_ndcg10=f"{m['ndcg@10']:.4f}")
                if stop.step(m["ndcg@10"], self.net.state_dict(), ep):
                    break
            if budget.epoch_done():
                self.fit_info["stopped_by_time_budget"] = True
                break
        if stop.best_state is not None:
            self.net.load_state_dict(stop.best_state)
        self.fit_info.update({"epochs": ep + 1, "best_epoch": stop.best_epoch + 1, "valid_ndcg@10": stop.best})

    def _score(self, user_ids: list[str], split: str) -> np.ndarray:
        return self._net_scores(np.array([self.user_index[x] for x in user_ids], dtype=np.int64))
