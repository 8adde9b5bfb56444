"""SASRec (Kang & McAuley, ICDM 2018): self-attentive sequential recommendation, in torch.

Architecture as in the paper: learned item + position embeddings, `blocks` pre-LayerNorm causal self-attention
blocks with a point-wise feed-forward network (width = hidden), dropout 0.2, a final LayerNorm, item embeddings
shared between input and output. Scores = h_t . e_i over the whole catalogue.

Loss (default `ce`): softmax cross-entropy over *all* items at every non-padding position ("SASRec+" in Klenitskiy &
Vasilev, RecSys 2023, whose full-ranking results are far better than the paper's binary cross-entropy with one
sampled negative). `loss="sampled_ce"`: softmax over the positive and `n_negatives` uniform negatives shared by the
batch ("SASRec+ N" in the same paper; ~3x cheaper per step on CPU, where the 3.7k-way softmax at every position
dominates). `loss="bce"` gives the original objective (one uniform negative per position, never its target).
Training sequences are the leave-one-out `train` events (last `max_len`); early stopping on valid full-ranking
NDCG@10 of a seeded user subset; the best epoch is kept. At test time the input is the train+valid events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from llmrec.baselines.base import Baseline, EarlyStopper, TimeBudget, check_values
from llmrec.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    loss: Literal["ce", "sampled_ce", "bce"] = "ce"
    n_negatives: int = 256  # sampled_ce: uniform negatives shared by the batch (+ the positive) at each position
    lr: float = 0.002  # with batch 64: ~1.4x the NDCG of (0.001, 128) at equal CPU time on ML-100K
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 200
    eval_every: int = 1
    patience: int = 5  # evaluations without a better valid NDCG@10
    valid_users: int = 1000  # seeded user subset for early stopping (0 = all)
    seed: int = 0
    threads: int | None = 1  # 1 thread was much faster than 2 on 2 busy shared cores
    time_budget_s: float | None = None  # stop training after this many seconds (recorded in fit_info)
    score_batch: int = 256

    def __post_init__(self) -> None:
        check_values(self, positive=("hidden", "blocks", "heads", "max_len", "n_negatives", "lr", "batch_size",
                                     "epochs", "eval_every", "score_batch"),
                     non_negative=("weight_decay", "patience", "valid_users", "threads", "time_budget_s"),
                     fraction=("dropout",))
        if self.hidden % self.heads:
            raise ConfigError(f"heads: hidden={self.hidden} does not split into {self.heads} heads")


def _make_net(n_items: int, c: SASRecConfig) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """Pre-LN causal multi-head self-attention + point-wise feed-forward, residuals, dropout."""

        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(c.hidden), nn.LayerNorm(c.hidden)
            self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
            self.out = nn.Linear(c.hidden, c.hidden)
            self.ff1, self.ff2 = nn.Linear(c.hidden, c.hidden), nn.Linear(c.hidden, c.hidden)
            self.drop = nn.Dropout(c.dropout)

        def forward(self, x: Any, mask: Any) -> Any:
            b, n, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, c.heads, d // c.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=c.dropout if self.training else 0.0)
            x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
            return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.item = nn.Embedding(n_items + 1, c.hidden, padding_idx=0)
            self.pos = nn.Embedding(c.max_len, c.hidden)
            self.drop = nn.Dropout(c.dropout)
            self.blocks = nn.ModuleList(Block() for _ in range(c.blocks))
            self.norm = nn.LayerNorm(c.hidden)
            nn.init.normal_(self.item.weight, std=0.05)
            nn.init.normal_(self.pos.weight, std=0.05)
            with torch.no_grad():
                self.item.weight[0].zero_()

        def forward(self, seq: Any) -> Any:
            """seq: [B, L] item index + 1, left-padded with 0 (L <= max_len; the last slot is the most recent event,
            position embeddings count from the end) -> hidden states [B, L, d]."""
            b, n = seq.shape
            real = seq > 0
            x = self.item(seq) * (c.hidden**0.5) + self.pos.weight[-n:][None]
            x = self.drop(x) * real[..., None]
            causal = torch.ones(n, n, dtype=torch.bool).tril()  # True = may attend
            mask = (causal[None] & real[:, None, :]) | torch.eye(n, dtype=torch.bool)[None]  # pads see themselves
            mask = mask[:, None]
            for blk in self.blocks:
                x = blk(x, mask) * real[..., None]
            return self.norm(x)

        def logits(self, h: Any) -> Any:
            return h @ self.item.weight[1:].T

    return Net()


class SASRec(Baseline):
    name = "sasrec"
    config_cls = SASRecConfig

    def _pad(self, seqs: list[np.ndarray]) -> np.ndarray:
        n = self.cfg.max_len
        out = np.zeros((len(seqs), n), dtype=np.int64)
        for r, s in enumerate(seqs):
            s = s[-n:]
            if len(s):
                out[r, n - len(s) :] = s + 1
        return out

    def _fit(self, ds: Any, progress: bool = True) -> None:
        import torch
        import torch.nn.functional as F

        c: SASRecConfig = self.cfg
        seqs = [items for items, _ in self.histories("valid").values() if len(items) >= 2]
        if not seqs:
            raise ValueError(f"{ds.name}: no user has 2 training events; SASRec cannot train")
        inp = torch.as_tensor(self._pad([s[:-1] for s in seqs]))
        tgt = torch.as_tensor(self._pad([s[1:] for s in seqs]))
        lengths = np.minimum(np.array([len(s) - 1 for s in seqs]), c.max_len)
        rng = np.random.default_rng(c.seed)
        self.net = _make_net(ds.n_items, c)
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr, betas=(0.9, 0.98), weight_decay=c.weight_decay)
        stop = EarlyStopper(c.patience)
        gen = torch.Generator().manual_seed(c.seed)
        budget = TimeBudget(c.time_budget_s)
        bar = tqdm(range(c.epochs), desc="sasrec", disable=not progress)
        ep = -1
        for ep in bar:
            self.net.train()
            # length buckets (sorted by jittered length, batches shuffled): each batch is cut to its longest sequence
            order = np.argsort(lengths + rng.uniform(0, 8, len(lengths)), kind="stable")
            batches = [order[b : b + c.batch_size] for b in range(0, len(order), c.batch_size)]
            tot, cnt = 0.0, 0
            for bi in rng.permutation(len(batches)):
                k = torch.as_tensor(batches[bi])
                n = int(lengths[batches[bi]].max())
                x, y = inp[k, -n:], tgt[k, -n:]
                keep = y > 0
                h = self.net(x)[keep]
                yt = y[keep] - 1
                if c.loss == "ce":
                    loss = F.cross_entropy(self.net.logits(h), yt)
                elif c.loss == "sampled_ce":
                    neg = torch.randint(0, ds.n_items, (c.n_negatives,), generator=gen)
                    pos_s = (h * self.net.item(yt + 1)).sum(-1, keepdim=True)
                    neg_s = (h @ self.net.item(neg + 1).T).masked_fill(neg[None] == yt[:, None], float("-inf"))
                    loss = F.cross_entropy(torch.cat([pos_s, neg_s], 1), torch.zeros_like(yt))
                else:
                    # uniform over the items other than the position's target (an offset of 1..n_items-1)
                    neg = (yt + torch.randint(1, ds.n_items, yt.shape, generator=gen)) % ds.n_items
                    pos_s = (h * self.net.item(yt + 1)).sum(-1)
                    neg_s = (h * self.net.item(neg + 1)).sum(-1)
                    loss = F.binary_cross_entropy_with_logits(
                        torch.cat([pos_s, neg_s]), torch.cat([torch.ones_like(pos_s), torch.zeros_like(neg_s)])
                    )
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    self.net.item.weight[0].zero_()
                tot += float(loss.detach()) * len(yt)
                cnt += len(yt)
            over = budget.epoch_done()
            if (ep + 1) % c.eval_every == 0 or ep + 1 == c.epochs or over:
                m = self.valid_ranking(c.valid_users or None, c.seed)
                bar.set_postfix(loss=f"{tot / max(1, cnt):.4f}", valid_ndcg10=f"{m['ndcg@10']:.4f}")
                log.debug("sasrec epoch %d loss %.4f valid ndcg@10 %.4f", ep + 1, tot / max(1, cnt), m["ndcg@10"])
                if stop.step(m["ndcg@10"], self.net.state_dict(), ep):
                    break
            if over:
                self.fit_info["stopped_by_time_budget"] = True
                log.warning("sasrec: time budget %.0f s reached after %d epochs", c.time_budget_s, ep + 1)
                break
        self.net.load_state_dict(stop.best_state)
        self.net.eval()
        self.fit_info.update({"epochs": ep + 1, "best_epoch": stop.best_epoch + 1, "valid_ndcg@10": stop.best,
                              "train_users": len(seqs)})

    def _score(self, user_ids: list[str], split: str) -> np.ndarray:
        import torch

        self.net.eval()
        out = np.zeros((len(user_ids), self.ds.n_items), dtype=np.float32)
        for b in range(0, len(user_ids), self.cfg.score_batch):
            ub = user_ids[b : b + self.cfg.score_batch]
            seq = torch.as_tensor(self._pad([self.history_of(u, split)[0] for u in ub]))
            with torch.no_grad():
                h = self.net(seq)[:, -1]
                out[b : b + len(ub)] = self.net.logits(h).numpy()
        return out

    def score_history(self, history: Any) -> np.ndarray:
        """[n_items] scores of the next item after an arbitrary history (item ids, or (item_id, ...) tuples, oldest
        first; unknown items are skipped), unmasked: the caller excludes what it must. This lets SASRec serve as the
        collaborative side of a retriever for users who are not in the training data (the event store)."""
        import torch

        if self.ds is None:
            raise RuntimeError(f"{self.name}: call fit(ds) or load(path) first")
        ids = [h[0] if isinstance(h, (tuple, list)) else h for h in history]
        idx = np.array([self.ds.item_index[str(i)] for i in ids if str(i) in self.ds.item_index], dtype=np.int64)
        self.net.eval()
        with torch.no_grad():
            h = self.net(torch.as_tensor(self._pad([idx])))[:, -1]
            return self.net.logits(h)[0].numpy().astype(np.float64)

    def _state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.net = _make_net(self.ds.n_items, self.cfg)
        self.net.load_state_dict(state["net"])
        self.net.eval()
