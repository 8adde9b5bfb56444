"""`llmrec.ranking`: verbalizer and generate ranking, Yes/No scoring, full-ranking score matrices, recommend with
explanations and their post-check, the LLM evaluations (TALLRec files, explanation metrics, contamination probe) and
`llmrec eval yesno`. Real parts: the tiny dataset, a 2-layer Llama built from config, the MiniLM text retriever;
scripted backends where a known answer makes the assertion sharper."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("faiss")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.llm.base import Backend, BackendError, cut_at_stop, normalize_choices  # noqa: E402
from llmrec.prompts import quote  # noqa: E402
from llmrec.ranking import HistEvent, RankingConfig, Recommendation, Recommender, to_hist_events  # noqa: E402
from llmrec.ranking.recommender import RecItem  # noqa: E402

USERS = ["u0", "u1", "u2", "u3", "u5"]


# ------------------------------------------------------------------------------------------------ scripted backends
class ScriptedBackend(Backend):
    """Deterministic backend. `score_choices`: logits from `logits(prompt, choices)` (default: 0, 1, 2, ... so the
    last choice wins); `generate`: `gen` (a string, or a function of the prompt), cut at `stop` as the contract says.
    Records every prompt."""

    name = "scripted"

    def __init__(self, gen="", logits=None):
        self.gen = gen
        self.logits = logits or (lambda prompt, choices: np.arange(len(choices), dtype=np.float64))
        self.scored: list[str] = []
        self.generated: list[str] = []

    @property
    def tokenizer(self):
        return None

    def score_choices(self, prompts, choices):
        per = normalize_choices(prompts, choices)
        self.scored += prompts
        x = np.stack([np.asarray(self.logits(p, c), dtype=np.float64) for p, c in zip(prompts, per)])
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, stop=None, frequency_penalty=0.0):
        self.generated += prompts
        self.frequency_penalties = getattr(self, "frequency_penalties", []) + [frequency_penalty]
        return [cut_at_stop(self.gen(p) if callable(self.gen) else self.gen, stop) for p in prompts]

    def generate_quoted(self, prompts, quotable, max_new_tokens=64, stop=None, frequency_penalty=0.0,
                        lead_quote=False):
        """Records the quotable lists, then generates as `generate` (the constraint itself is the backend's)."""
        self.quotable = getattr(self, "quotable", []) + list(quotable)
        self.lead_quote = lead_quote
        return self.generate(prompts, max_new_tokens=max_new_tokens, stop=stop, frequency_penalty=frequency_penalty)

    def generate_from(self, prompts, options, n, sep="\n"):
        """Constrained generation, scripted: `pick(prompt, options)` -> option indices (default: the last n, last
        first); checked against the contract (distinct, at most n)."""
        self.generated += prompts
        self.options = getattr(self, "options", []) + list(options)
        pick = getattr(self, "pick", None) or (lambda p, o: list(range(len(o)))[::-1])
        out = [list(pick(p, o))[:n] for p, o in zip(prompts, options)]
        assert all(len(set(x)) == len(x) for x in out)
        return out


def labelled_titles(prompt: str) -> dict[str, str]:
    """`A. "Action Story 12"` lines of a rank prompt -> {letter: title}."""
    return dict(re.findall(r'^([A-T])\. "([^"]+)"', prompt, re.M))


def number(title: str) -> int:
    return int(title.rsplit(" ", 1)[1])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def parts(tiny_dataset, tmp_path_factory):
    from llmrec.llm import load_backend
    from llmrec.retrieval import TextRetriever

    root = tmp_path_factory.mktemp("ranking")
    llm_dir = make_tiny_llm(root / "llm")
    backend = load_backend("transformers", model=str(llm_dir), dtype="float32")
    retriever = TextRetriever(cache_dir=root / "ret").build(tiny_dataset, progress=False)
    return SimpleNamespace(ds=tiny_dataset, backend=backend, retriever=retriever, llm_dir=llm_dir)


def make_rec(parts, backend=None, **cfg) -> Recommender:
    return Recommender(parts.ds, backend or parts.backend, parts.retriever,
                       RankingConfig(**{"n_candidates": 8, "max_prompt_tokens": 512, **cfg}))


@pytest.fixture(scope="module")
def rec(parts):
    return make_rec(parts)


def title(ds, item_id: str) -> str:
    return str(ds.titles[ds.item_index[item_id]])


def test_to_hist_events_reads_dicts_and_derives_liked():
    ev = to_hist_events([
        {"item_id": "i1", "type": "rating", "value": 5, "timestamp": 10},
        {"item_id": "i2", "type": "rating", "value": 2.0, "timestamp": 11},
        {"item_id": "i3", "type": "purchase", "timestamp": 12},
        HistEvent("i4", False, None, 13),
    ], like_threshold=3.0)
    assert [(e.item_id, e.liked, e.rating, e.timestamp) for e in ev] == [
        ("i1", True, 5, 10), ("i2", False, 2.0, 11), ("i3", None, None, 12), ("i4", False, None, 13)]
    # a timestamp that is no integer names the event and the field (int(nan) said only "cannot convert float NaN")
    for bad in (float("nan"), "noon"):
        with pytest.raises(ValueError, match=r"history event 1 \(item 'i2'\): timestamp .* is not an integer"):
            to_hist_events([{"item_id": "i1", "timestamp": 1}, {"item_id": "i2", "timestamp": bad}])


# ------------------------------------------------------------------------------------------------ 1. verbalizer
def test_verbalizer_orders_candidates_by_letter_logprobs(parts):
    rec = make_rec(parts, ScriptedBackend(), batch_size=2)
    hs = [rec.dataset_history(u, "test") for u in USERS]
    cands = [rec.candidates(h) for h in hs]
    assert all(len(c) == 8 for c in cands)
    ranked = rec.rank_candidates(hs, cands)
    for c, r in zip(cands, ranked):
        ids = [i for i, _ in c]
        assert [i for i, _ in r] == ids[::-1]  # the last letter is preferred: the last candidate comes first
        scores = np.array([s for _, s in r])
        assert np.all(scores <= 0) and np.exp(scores).sum() <= 1 + 1e-9
        assert np.all(np.diff(scores) < 0)
    assert len(rec.backend.scored) == len(USERS)

    # letter i is candidate i: prefer the highest item number named on a labelled line
    def by_number(prompt, choices):
        lab = labelled_titles(prompt)
        assert [c.strip() for c in choices] == list(lab)
        return np.array([number(lab[c.strip()]) for c in choices], dtype=np.float64)

    rec = make_rec(parts, ScriptedBackend(logits=by_number), batch_size=3)
    ranked = rec.rank_candidates(hs, cands)
    for c, r in zip(cands, ranked):
        assert [i for i, _ in r] == sorted((i for i, _ in c), key=lambda i: -int(i[1:]))

    with pytest.raises(ValueError, match="unknown ranking mode"):
        rec.rank_candidates(hs, cands, mode="listwise")


def test_listings_cancel_a_letter_prior(parts):
    """A model that prefers earlier letters (-1 per letter) and slightly higher item numbers (+0.01 each): one
    listing gives the listed order back; `listings` = n_candidates puts every candidate at every position once, so
    only the item numbers order them; k listings cost k scored prompts per user."""

    def first_letters(prompt, choices):
        lab = labelled_titles(prompt)
        return np.array([-j + 0.01 * number(lab[c.strip()]) for j, c in enumerate(choices)], dtype=np.float64)

    hs = [make_rec(parts).dataset_history(u, "test") for u in USERS]
    for k, expect in ((1, "listed"), (8, "content"), (2, None)):
        rec = make_rec(parts, ScriptedBackend(logits=first_letters), listings=k, batch_size=2)
        cands = [rec.candidates(h) for h in hs]
        ranked = rec.rank_candidates(hs, cands)
        assert len(rec.backend.scored) == len(USERS) * k
        for c, r in zip(cands, ranked):
            ids = [i for i, _ in c]
            got = [i for i, _ in r]
            if expect == "listed":
                assert got == ids
            elif expect == "content":
                assert got == sorted(ids, key=lambda i: -int(i[1:]))
            else:  # two listings, shifted by 4: candidate j sits at j and (j + 4) % 8; mean -(j + (j + 4) % 8) / 2
                pos = {i: (j + (j + 4) % 8) / 2 for j, i in enumerate(ids)}
                assert got == sorted(ids, key=lambda i: (pos[i] - 0.01 * int(i[1:])))
    with pytest.raises(ValueError, match="listings must be >= 1"):
        make_rec(parts, ScriptedBackend(), listings=0).rank_candidates(hs[:1], [make_rec(parts).candidates(hs[0])])


def test_cyclic_shift_and_mean_over_listings_hand_computed():
    from llmrec.ranking.recommender import cyclic_shift, mean_over_listings

    ids = ["a", "b", "c", "d", "e"]
    assert [cyclic_shift(ids, s, 1) for s in range(1)] == [ids]
    assert [cyclic_shift(ids, s, 2) for s in range(2)] == [ids, ["c", "d", "e", "a", "b"]]  # round(2.5) = 2
    assert [cyclic_shift(ids, s, 5)[0] for s in range(5)] == ids
    assert cyclic_shift([], 0, 3) == []
    got = mean_over_listings(["a", "b", "c"], [(["a", "b", "c"], np.log([0.5, 0.3, 0.2])),
                                              (["c", "a", "b"], np.log([0.6, 0.3, 0.1]))])
    np.testing.assert_allclose(got, [(np.log(0.5) + np.log(0.3)) / 2, (np.log(0.3) + np.log(0.1)) / 2,
                                     (np.log(0.2) + np.log(0.6)) / 2])
    assert mean_over_listings(["a", "z"], [(["a"], np.array([-1.0]))])[1] == -np.inf
    with pytest.raises(ValueError, match="2 listed candidates but 1 LLM scores"):
        mean_over_listings(["a", "b"], [(["a", "b"], np.array([-1.0]))])


def test_verbalizer_batched_equals_one_user_at_a_time(parts):
    rec1 = make_rec(parts, batch_size=1)
    hs = [rec1.dataset_history(u, "test") for u in USERS]
    cands = [rec1.candidates(h) for h in hs]
    saved = parts.backend.batch_size
    try:
        parts.backend.batch_size = 1
        one = rec1.rank_candidates(hs, cands)
        parts.backend.batch_size = 4
        batched = make_rec(parts, batch_size=4).rank_candidates(hs, cands)
    finally:
        parts.backend.batch_size = saved
    for a, b, c in zip(one, batched, cands):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert sorted(i for i, _ in a) == sorted(i for i, _ in c)
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
        assert np.exp([s for _, s in a]).sum() <= 1 + 1e-6
    assert any(len({round(s, 6) for _, s in a}) > 1 for a in one)  # real, distinct log-probs


def test_fuse_with_retrieval_hand_computed():
    from llmrec.ranking.recommender import fuse_with_retrieval

    ids = ["a", "b", "c"]  # retrieval order
    lp = np.log([0.2, 0.3, 0.5])
    assert [i for i, _ in fuse_with_retrieval(ids, lp, 0.0)] == ["c", "b", "a"]  # the LLM alone
    # w = 1: s = log p - log(rank) = log(0.2), log(0.15), log(0.5/3 = 0.1667) -> a, c, b
    got = fuse_with_retrieval(ids, lp, 1.0)
    assert [i for i, _ in got] == ["a", "c", "b"]
    np.testing.assert_allclose([s for _, s in got], np.log([0.2, 0.5 / 3, 0.15]))
    assert [i for i, _ in fuse_with_retrieval(ids, lp, 100.0)] == ids  # the retriever's order
    with pytest.raises(ValueError, match="3 candidates but 2 LLM scores"):
        fuse_with_retrieval(ids, lp[:2], 1.0)


def test_retrieval_weight_chosen_on_valid_scores_each_prompt_once(parts):
    """select_retrieval_weight evaluates on the validation split (histories end before the valid target), scores
    each prompt once across the grid, and keeps the weight with the best validation NDCG@10 (ties: the smaller)."""
    from llmrec.evaluation import evaluate_ranking
    from llmrec.ranking.evaluate import eval_rank, select_retrieval_weight

    be = ScriptedBackend()  # the last letter always wins: the reverse of the retrieval order
    rec = make_rec(parts, be)
    calls: list[tuple[str, str]] = []
    real = rec.dataset_history
    rec.dataset_history = lambda u, split="all": calls.append((u, split)) or real(u, split)
    sel = select_retrieval_weight(rec, parts.ds, [0.0, 1.0, 50.0], max_users=5, seed=0)
    n_valid_prompts = len(be.scored)
    assert 0 < n_valid_prompts <= 5 and len(rec.llm_cache) == n_valid_prompts
    assert set(sel["valid"]) == {0.0, 1.0, 50.0}
    best = max(sel["valid"], key=lambda w: (sel["valid"][w]["ndcg@10"], -w))
    assert sel["selected"] == best == rec.cfg.retrieval_weight
    # w=50 reproduces the retriever's order on the candidates: same NDCG@10 as retrieval alone on valid
    ret = evaluate_ranking(parts.ds, lambda u: parts.retriever.score_items(list(u), "valid"), "valid", ks=(10,),
                           max_users=5, seed=0)
    assert sel["valid"][50.0]["ndcg@10"] == pytest.approx(ret["ndcg@10"], abs=1e-12)
    # the validation pass read histories that stop before each user's validation target
    assert {sp for _, sp in calls} == {"valid"} and len({u for u, _ in calls}) == 5
    tg = parts.ds.targets("valid").set_index("user_id")["item_id"]
    for u in {u for u, _ in calls}:
        assert tg[u] not in {e.item_id for e in real(u, "valid")}
    # a test evaluation at two weights scores each test prompt once more, not twice
    eval_rank(rec, parts.ds, 5, 0, mode="verbalizer")
    after_one = len(be.scored)
    rec.cfg.retrieval_weight = 0.0
    eval_rank(rec, parts.ds, 5, 0, mode="verbalizer")
    assert after_one > n_valid_prompts and len(be.scored) == after_one


# ------------------------------------------------------------------------------------------------ likelihood
class LikelihoodBackend(ScriptedBackend):
    """score_continuations: a title's log-prob sum = its item number, over (1 + number % 3) tokens; records calls."""

    def score_continuations(self, prompts, continuations):
        per = normalize_choices(prompts, continuations)
        self.continued = getattr(self, "continued", []) + list(zip(prompts, per))
        nums = np.array([[number(c.strip().strip('"')) for c in cs] for cs in per], dtype=np.float64)
        return nums.copy(), 1 + nums % 3


def test_likelihood_mode_ranks_by_mean_title_logprob_without_a_candidate_list(parts):
    be = LikelihoodBackend()
    rec = make_rec(parts, be, mode="likelihood", batch_size=2)
    hs = [rec.dataset_history(u, "test") for u in USERS]
    cands = [rec.candidates(h) for h in hs]
    ranked = rec.rank_candidates(hs, cands)
    for c, r in zip(cands, ranked):
        nums = {i: number(title(parts.ds, i)) for i, _ in c}
        mean = {i: n / (1 + n % 3) for i, n in nums.items()}
        assert [i for i, _ in r] == sorted(mean, key=lambda i: -mean[i])  # distinct means on the tiny titles
        assert [s for _, s in r] == pytest.approx(sorted(mean.values(), reverse=True))
    assert len(be.continued) == len(USERS) and not be.scored  # no letter scoring
    for (prompt, conts), c in zip(be.continued, cands):
        assert conts == [" " + quote(title(parts.ds, i)) for i, _ in c]  # titles as prompts quote them
        assert "Choose among" not in prompt and prompt.rstrip().endswith("Title:")
        assert not any(f"-{t}" in prompt for t in conts)  # no candidate listed in the prompt (`- "Title"` lines)
    by_sum = make_rec(parts, LikelihoodBackend(), mode="likelihood", likelihood_norm="sum").rank_candidates(hs, cands)
    for c, r in zip(cands, by_sum):
        assert [i for i, _ in r] == sorted((i for i, _ in c), key=lambda i: -number(title(parts.ds, i)))
    with pytest.raises(ValueError, match="likelihood_norm"):
        make_rec(parts, LikelihoodBackend(), mode="likelihood", likelihood_norm="max").rank_candidates(hs, cands)
    with pytest.raises(BackendError, match="score_continuations"):  # a backend without it says so
        make_rec(parts, ScriptedBackend(), mode="likelihood").rank_candidates(hs, cands)


class PriorBackend(LikelihoodBackend):
    """LikelihoodBackend, except that after the history-free prompt ("(none)") a title's sum is twice its number."""

    def score_continuations(self, prompts, continuations):
        sums, counts = super().score_continuations(prompts, continuations)
        return np.array([row * (2 if "(none)" in p else 1) for p, row in zip(prompts, sums)]), counts


def test_likelihood_prior_weight_subtracts_each_titles_history_free_score_scored_once(parts):
    be = PriorBackend()
    rec = make_rec(parts, be, mode="likelihood", likelihood_prior_weight=1.0, batch_size=2)
    hs = [rec.dataset_history(u, "test") for u in USERS]
    cands = [rec.candidates(h) for h in hs]
    ranked = rec.rank_candidates(hs, cands)
    for c, r in zip(cands, ranked):  # mean - 1.0 * (2 * mean) = -mean: the plain likelihood's order reversed
        mean = {i: number(title(parts.ds, i)) / (1 + number(title(parts.ds, i)) % 3) for i, _ in c}
        assert [i for i, _ in r] == sorted(mean, key=lambda i: mean[i])
        assert [s for _, s in r] == pytest.approx(sorted((-m for m in mean.values()), reverse=True))
    prior_calls = [(p, conts) for p, conts in be.continued if "(none)" in p]
    assert prior_calls and len({p for p, _ in prior_calls}) == 1  # one history-free prompt
    titles = [t for _, conts in prior_calls for t in conts]
    assert len(titles) == len(set(titles)) == len({i for c in cands for i, _ in c})  # each title scored once
    n = len(be.continued)
    rec.rank_candidates(hs, cands)
    assert all("(none)" not in p for p, _ in be.continued[n:])  # priors come from the cache the second time
    plain = make_rec(parts, PriorBackend(), mode="likelihood").rank_candidates(hs, cands)  # weight 0: no prior
    assert [[i for i, _ in r][::-1] for r in plain] == [[i for i, _ in r] for r in ranked]


def test_likelihood_weight_chosen_on_valid_scores_each_prompt_once(parts):
    from llmrec.ranking.evaluate import eval_rank, select_retrieval_weight

    be = LikelihoodBackend()
    rec = make_rec(parts, be, mode="likelihood")
    sel = select_retrieval_weight(rec, parts.ds, [0.0, 1.0, 50.0], max_users=5, seed=0, mode="likelihood")
    assert len(be.continued) == 5 and sel["selected"] == rec.cfg.retrieval_weight
    eval_rank(rec, parts.ds, 5, 0, mode="likelihood")
    rec.cfg.retrieval_weight = 0.0
    eval_rank(rec, parts.ds, 5, 0, mode="likelihood")
    assert len(be.continued) == 10  # the 5 test prompts once, for both weights


def test_likelihood_mode_on_a_tiny_model_equals_its_continuation_scores(parts):
    rec = make_rec(parts, mode="likelihood")
    hs = [rec.dataset_history(u, "test") for u in USERS[:3]]
    cands = [rec.candidates(h) for h in hs]
    ranked = rec.rank_candidates(hs, cands)
    for h, c, r in zip(hs, cands, ranked):
        prompt = rec._render("next_title", h).text
        sums, counts = parts.backend.score_continuations([prompt], [[" " + quote(title(parts.ds, i)) for i, _ in c]])
        mean = dict(zip((i for i, _ in c), sums[0] / counts[0]))
        assert [s for _, s in r] == pytest.approx(sorted(mean.values(), reverse=True), abs=1e-6)
        assert [i for i, _ in r][0] == max(mean, key=mean.get)


# ------------------------------------------------------------------------------------------------ 2. generate
def test_map_titles_exact_case_quotes_markers_and_unmapped(rec, tiny_dataset):
    h = rec.dataset_history("u2", "test")
    cands = [c for c, _ in rec.candidates(h)]
    t = [title(tiny_dataset, c) for c in cands]
    hist_title = title(tiny_dataset, h[0].item_id)
    rec.last_generate_stats = {"lines": 0, "mapped": 0, "unmapped": 0}
    text = "\n".join([
        f"1. {t[3]}",
        f'- "{t[5].upper()}"',
        "",
        f"* '{t[0].lower()}'",
        "A lovely purple elephant dancing",
        f"2) {t[3]}",  # a repeat: mapped, kept once
        hist_title,  # a catalogue title that is not a candidate (the user has seen it)
        f"{t[7]}",
    ])
    named = rec.map_titles(text, cands)
    assert named == [cands[3], cands[5], cands[0], cands[7]]
    assert rec.last_generate_stats == {"lines": 7, "mapped": 5, "unmapped": 2}


def _fake_ds(titles: list[str], years: list[str] | None = None):
    ids = [f"m{j}" for j in range(len(titles))]
    items = pd.DataFrame({"item_id": ids, "title": titles, **({"year": years} if years else {})})
    return SimpleNamespace(item_ids=np.array(ids), titles=np.array(titles), items=items, domain="movie",
                           item_index={i: n for n, i in enumerate(ids)}, text_fields=[], name="fake")


def test_map_titles_keeps_digits_of_titles_and_uses_embedding_threshold():
    titles = ["1984 (1956)", "12 Angry Men (1957)", "2001: A Space Odyssey (1968)", "Matrix, The (1999)", "Heat"]
    sims = {"Twelve angry jurors": np.array([0.1, 0.9, 0.2, 0.1]),
            "Space thing": np.array([0.1, 0.2, 0.7, 0.1])}  # below the 0.75 threshold
    retriever = SimpleNamespace(similar_texts=lambda line, texts: sims[line])
    rec = Recommender(_fake_ds(titles), ScriptedBackend(), retriever, RankingConfig(n_candidates=5))
    cands = ["m0", "m1", "m2", "m3"]
    text = "1. 1984\n2. 2001: A Space Odyssey\n3) The Matrix\n12 Angry Men (1957)\nTwelve angry jurors\nSpace thing"
    assert rec.map_titles(text, cands) == ["m0", "m2", "m3", "m1"]
    assert rec.last_generate_stats == {"lines": 6, "mapped": 5, "unmapped": 1}
    assert rec.map_titles("Heat", cands) == []  # in the catalogue, not a candidate


def test_generate_mode_named_first_then_retrieval_order(parts, tiny_dataset):
    def answer(prompt):
        assert "Choose among these items:" in prompt and prompt.endswith("Title:")
        cand_titles = re.findall(r'^- "([^"]+)"$', prompt.split("Choose among these items:")[1], re.M)
        assert len(cand_titles) == 8
        return f' 1. "{cand_titles[6]}"\n2. {cand_titles[2].lower()}\n3. Nothing Like It At All\n'

    rec = make_rec(parts, ScriptedBackend(gen=answer), mode="generate", generate_constrained=False, batch_size=2)
    hs = [rec.dataset_history(u, "test") for u in USERS[:3]]
    cands = [rec.candidates(h) for h in hs]
    ranked = rec.rank_candidates(hs, cands)
    for c, r in zip(cands, ranked):
        ids = [i for i, _ in c]
        assert [i for i, _ in r] == [ids[6], ids[2]] + [i for i in ids if i not in (ids[6], ids[2])]
        assert [s for _, s in r] == [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert rec.last_generate_stats == {"lines": 9, "mapped": 6, "unmapped": 3}

    # the model names a history title: never recommended back (seen), the candidates keep their order
    h = rec.dataset_history("u2")
    rec = make_rec(parts, ScriptedBackend(gen=title(tiny_dataset, h[-1].item_id)), mode="generate",
                   generate_constrained=False)
    r = rec.recommend("u2", k=4, explain=False)
    assert [i.item_id for i in r.items] == [c for c, _ in rec.candidates(h)][:4]
    assert rec.last_generate_stats == {"lines": 1, "mapped": 0, "unmapped": 1}


def test_generate_constrained_ranks_the_written_candidates_first(parts, tiny_dataset):
    backend = ScriptedBackend()
    backend.pick = lambda prompt, opts: [6, 2, 7]
    rec = make_rec(parts, backend, mode="generate", batch_size=2, generate_titles=3)
    hs = [rec.dataset_history(u, "test") for u in USERS[:3]]
    cands = [rec.candidates(h) for h in hs]
    ranked = rec.rank_candidates(hs, cands)
    for c, r, opts in zip(cands, ranked, backend.options):
        ids = [i for i, _ in c]
        assert opts == [f' "{title(tiny_dataset, i)}"' for i in ids]  # the titles as quoted in the prompt
        assert [i for i, _ in r] == [ids[6], ids[2], ids[7]] + [i for i in ids if i not in (ids[6], ids[2], ids[7])]
        assert [s for _, s in r] == [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert all(p.endswith("Title:") for p in backend.generated)
    assert rec.last_generate_stats == {"lines": 9, "mapped": 9, "unmapped": 0}
    with pytest.raises(BackendError, match="not supported"):  # a backend without constrained decoding says so
        Backend.generate_from(backend, ["x"], [[" a"]], 1)


def test_generate_constrained_on_a_tiny_model_names_distinct_candidates(parts):
    rec = make_rec(parts, mode="generate", generate_titles=5)
    hs = [rec.dataset_history(u, "test") for u in USERS]
    cands = [rec.candidates(h) for h in hs]
    ranked = rec.rank_candidates(hs, cands)
    for c, r in zip(cands, ranked):
        assert sorted(i for i, _ in r) == sorted(i for i, _ in c)  # a permutation of the candidates
    assert rec.last_generate_stats == {"lines": 5 * len(USERS), "mapped": 5 * len(USERS), "unmapped": 0}
    again = rec.rank_candidates(hs, cands)
    assert again == ranked  # greedy: deterministic


# ------------------------------------------------------------------------------------------------ 3. yes/no
def test_yesno_probs_equal_softmax_of_first_token_logits(rec, tiny_dataset):
    import torch

    h = rec.dataset_history("u3", "test")
    targets = ["i0", "i1", "i7", "i30"]
    probs = rec.yesno_probs([h] * len(targets), targets)
    assert probs.shape == (4,) and np.all((probs > 0) & (probs < 1))
    tok, model = rec.backend.tokenizer, rec.backend.model
    yes, no = (tok.encode(c, add_special_tokens=False)[0] for c in (" Yes", " No"))
    assert yes != no
    want = []
    for t in targets:
        text = rec._render("yesno", h, target=rec._items([t])[0]).text
        assert f'"{title(tiny_dataset, t)}"? Answer Yes or No.\nAnswer:' in text
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
        want.append(torch.softmax(logits[[yes, no]], -1)[0].item())
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert np.ptp(probs) > 1e-6  # depends on the target

    got = rec.score_yesno("u3", targets, history=[{"item_id": e.item_id, "liked": e.liked, "rating": e.rating,
                                                    "timestamp": e.timestamp} for e in h])
    np.testing.assert_allclose(got, probs, atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        rec.score_yesno("u3", ["i0", "nope"])


def test_yesno_stats_template_renders_each_rows_feedback(parts, tiny_dataset):
    from llmrec.data.stats import ItemFeedbackStats, yesno_row_feedback
    from llmrec.evaluation import yesno_subset
    from llmrec.prompts import target_stats_text

    backend = ScriptedBackend()
    rec = make_rec(parts, backend, templates={"yesno": "yesno_stats"})
    ex = yesno_subset(tiny_dataset, "test", 6, 0)
    rec.yesno_examples_probs(ex)
    assert len(backend.scored) == 6
    for text, fb in zip(backend.scored, yesno_row_feedback(tiny_dataset, ex)):  # as of the test cut-off
        assert target_stats_text(fb, tiny_dataset.domain) in text
    backend.scored.clear()
    rec.score_yesno("u3", ["i0"])  # serving: every interaction known now
    assert target_stats_text(ItemFeedbackStats.from_dataset(tiny_dataset).at("i0"), tiny_dataset.domain) in \
        backend.scored[0]
    # yesno_estimate: the same feedback, also combined with the row's own history into the estimate line
    from llmrec.data.stats import counts_estimate

    backend.scored.clear()
    make_rec(parts, backend, templates={"yesno": "yesno_estimate"}).yesno_examples_probs(ex)
    assert len(backend.scored) == 6
    for text, fb, labels in zip(backend.scored, yesno_row_feedback(tiny_dataset, ex), ex["hist_labels"]):
        p = counts_estimate(fb.n, fb.liked, len(labels), int(sum(labels)))
        assert target_stats_text(fb, tiny_dataset.domain) in text
        assert f"Estimate from these two counts alone: {round(100 * p)}%" in text
    with pytest.raises(ValueError, match="is a 'rank' template"):
        make_rec(parts, backend, templates={"yesno": "rank"})
    with pytest.raises(ValueError, match="unknown task"):
        make_rec(parts, backend, templates={"nope": "rank"})


# ------------------------------------------------------------------------------------------------ 4. score_matrix
def test_score_matrix_candidates_on_top_without_leakage(parts, tiny_dataset):
    rec = make_rec(parts)
    seen_hist: list[list[HistEvent]] = []
    inner = rec.rank_candidates

    def spy(histories, cands, mode=None):
        seen_hist.extend(histories)
        return inner(histories, cands, mode)

    rec.rank_candidates = spy
    prompts: list[str] = []
    real_score = parts.backend.score_choices
    rec.backend = SimpleNamespace(tokenizer=parts.backend.tokenizer, name="spy",
                                  score_choices=lambda p, c: (prompts.extend(p), real_score(p, c))[1])
    users = USERS[:4]
    m = rec.score_matrix(users, "test")
    assert m.shape == (len(users), tiny_dataset.n_items) and np.isfinite(m).all()
    targets = tiny_dataset.targets("test").set_index("user_id")["item_id"]
    for u, user in enumerate(users):
        h = tiny_dataset.history(user, before="test")
        assert set(h["split"]) <= {"train", "valid"}
        used = [e.item_id for e in seen_hist[u]]
        assert used == list(h["item_id"])  # exactly the train+valid events, in time order
        assert targets[user] not in used
        cands = [c for c, _ in rec.candidates(seen_hist[u])]
        assert len(cands) == 8 and not set(cands) & set(used)
        cidx = [tiny_dataset.item_index[c] for c in cands]
        others = np.delete(m[u], cidx)
        assert m[u, cidx].min() > others.max()
        top = [str(tiny_dataset.item_ids[j]) for j in np.argsort(-m[u], kind="stable")[:8]]
        assert top == [i for i, _ in inner([seen_hist[u]], [rec.candidates(seen_hist[u])])[0]]
        hist_part = prompts[u].split("Candidate items:")[0]
        assert f'"{title(tiny_dataset, targets[user])}"' not in hist_part
        assert f'"{title(tiny_dataset, used[-1])}"' in hist_part


def test_itemcf_retriever_needs_no_encoder_and_ranks_full_catalogue(parts, tiny_dataset, monkeypatch):
    """`itemcf`: item-CF alone, built without the sentence-transformer (data without texts, a machine without the
    encoder); the Recommender ranks its candidates and the full-ranking matrix keeps them on top."""
    import llmrec.retrieval as retrieval
    from llmrec.ranking.factory import build_retriever
    from llmrec.retrieval.cf import ItemCF

    def no_encoder(*a, **k):
        raise AssertionError("the itemcf retriever must not build the text retriever")

    monkeypatch.setattr(retrieval, "TextRetriever", no_encoder)
    ret = build_retriever(tiny_dataset, "itemcf")
    assert isinstance(ret, ItemCF)
    rec = Recommender(tiny_dataset, ScriptedBackend(), ret, RankingConfig(n_candidates=8, max_prompt_tokens=512))
    hist = rec.dataset_history("u0", "test")
    cands = rec.candidates(hist)
    seen = {e.item_id for e in hist}
    assert len(cands) == 8 and not {i for i, _ in cands} & seen
    assert [i for i, _ in cands] == [i for i, _ in ret.query(hist, k=8, exclude=seen)]  # the CF order itself
    ranked = rec.rank_candidates([hist], [cands])[0]
    assert [i for i, _ in ranked] == [i for i, _ in cands][::-1]  # the scripted backend prefers the last letter
    m = rec.score_matrix(["u0"], "test")
    cidx = [tiny_dataset.item_index[i] for i, _ in cands]
    assert m[0, cidx].min() > np.delete(m[0], cidx).max()


# ------------------------------------------------------------------------------------------------ 5. recommend
def test_recommend_and_batch_real_llm(rec, tiny_dataset):
    r = rec.recommend("u2", k=4, explain=True)
    ids = [i.item_id for i in r.items]
    assert len(ids) == 4 and len(set(ids)) == 4 and [i.rank for i in r.items] == [1, 2, 3, 4]
    assert not set(ids) & set(tiny_dataset.history("u2", before="all")["item_id"])
    assert set(ids) <= {c for c, _ in rec.candidates(rec.dataset_history("u2"))}
    assert [i.title for i in r.items] == [title(tiny_dataset, i) for i in ids]
    assert all(a.score >= b.score for a, b in zip(r.items, r.items[1:]))
    assert isinstance(r.explanation, str) and r.explanation.strip()
    if r.explanation_fallback:
        assert f'"{r.items[0].title}"' in r.explanation
    assert r.backend == rec.backend.name and r.stats["seconds_per_user"] > 0
    assert (r.model, r.backend) == ("llm", "transformers:llm")  # the model folder's name; the engine apart

    batch = rec.recommend_batch(["u2", "u5", "u9"], k=3, explain=False)
    assert [b.user_id for b in batch] == ["u2", "u5", "u9"]
    for b in batch:
        one = rec.recommend(b.user_id, k=3, explain=False)
        assert b.explanation is None and [i.item_id for i in b.items] == [i.item_id for i in one.items]
        np.testing.assert_allclose([i.score for i in b.items], [i.score for i in one.items], atol=1e-5)
    assert [i.item_id for i in batch[0].items] == ids[:3]


def test_explicit_history_overrides_dataset_history(parts, tiny_dataset):
    backend = ScriptedBackend()
    rec = make_rec(parts, backend)
    ev = [{"item_id": f"i{j}", "type": "rating", "value": 5, "timestamp": 1000 + j} for j in (0, 4, 8, 12, 16)]
    r = rec.recommend("u2", k=4, explain=False, history=ev)
    own = [c for c, _ in rec.candidates(to_hist_events(ev))]
    assert [i.item_id for i in r.items] == own[::-1][:4]  # scripted: last letter first
    assert not {i.item_id for i in r.items} & {e["item_id"] for e in ev}
    assert set(own) != {c for c, _ in rec.candidates(rec.dataset_history("u2"))}
    prompt = backend.scored[-1].split("Candidate items:")[0]
    assert '"Action Story 0" (liked)' in prompt and '"Action Story 16" (liked)' in prompt
    assert "Drama Story" not in prompt  # u2's dataset history (dramas) is not used
    rb = rec.recommend_batch(["u2", "u2"], histories=[ev, None], k=4, explain=False)
    assert [i.item_id for i in rb[0].items] == [i.item_id for i in r.items]
    assert [i.item_id for i in rb[1].items] == [c for c, _ in rec.candidates(rec.dataset_history("u2"))][::-1][:4]


def _other_item(rec, user: str) -> str:
    """A catalogue item neither in the user's history nor among their candidates."""
    h = rec.dataset_history(user)
    taken = {e.item_id for e in h} | {c for c, _ in rec.candidates(h)}
    return next(str(i) for i in rec.ds.item_ids if str(i) not in taken)


@pytest.mark.parametrize("case", ["invented", "unseen_catalogue", "ungrounded", "empty"])
def test_explanation_fallback_when_post_check_fails(parts, tiny_dataset, case):
    probe = make_rec(parts, ScriptedBackend())
    other = _other_item(probe, "u2")
    gen = {"invented": ' "The Midnight Llama Returns", a hidden gem.',
           "unseen_catalogue": f' "{title(tiny_dataset, other)}" a lot.',
           "ungrounded": " nice things and these are nice too.",
           "empty": "   "}[case]
    backend = ScriptedBackend(gen=gen)
    rec = make_rec(parts, backend)
    r = rec.recommend("u2", k=4, explain=True)
    assert r.explanation_fallback is True
    assert r.explanation.startswith("Recommended ")
    assert f'"{r.items[0].title}"' in r.explanation
    assert "Midnight Llama" not in r.explanation
    want_hall = {"invented": ["The Midnight Llama Returns"], "unseen_catalogue": [other]}.get(case, [])
    assert r.hallucinated == want_hall
    why = {"invented": ['"The Midnight Llama Returns"'], "unseen_catalogue": [f'"{title(tiny_dataset, other)}"'],
           "ungrounded": ["cites no history item"], "empty": ["was empty"]}[case]
    assert r.explanation_fallback_reasons and all(any(w in x for x in r.explanation_fallback_reasons) for w in why), (
        r.explanation_fallback_reasons)
    explain_prompt = backend.generated[-1]
    assert all(f'- "{i.title}"' in explain_prompt.split("Recommended items:")[1] for i in r.items[:3])


def test_a_genre_claim_no_explained_or_cited_item_has_falls_back(parts, tiny_dataset):
    """The check read genre words as grounding only ("these horror films" passed for dramas); a genre the text
    claims must belong to a recommended item it explains or a history item it cites. The generated text was
    grounded (it cites a liked title), so the metric records that, and the fallback is shown."""
    rec = make_rec(parts, ScriptedBackend())
    h = rec.dataset_history("u2")
    liked = [e.item_id for e in h if e.liked]
    named = title(tiny_dataset, liked[-1])
    top3 = [i.item_id for i in rec.recommend("u2", k=4, explain=False).items[:3]]
    genres = {g for i in [*top3, liked[-1]] for g in rec._attrs(i)}
    foreign = next(g for g in ["Horror", "Comedy", "Action", "Drama"] if g not in genres)
    backend = ScriptedBackend(gen=f' {foreign.lower()} films such as "{named}".')
    r = make_rec(parts, backend).recommend("u2", k=4, explain=True)
    assert r.explanation_fallback is True and r.explanation_grounded is True, (r.explanation, genres)
    # (a claim in the filler after the last cited title is cut with it: `drop_empty_tail`)
    ok = ScriptedBackend(gen=f' {sorted(genres)[0].lower()} films such as "{named}".')
    r2 = make_rec(parts, ok).recommend("u2", k=4, explain=True)
    assert r2.explanation_fallback is False and r2.explanation_grounded is True, r2.explanation
    rec3 = make_rec(parts, ok)
    assert rec3.attribute_vocabulary() == {"Action", "Comedy", "Drama", "Horror"}
    # the answer is kept per max_values: a tighter bound after the default one is not served the default's answer
    assert rec3.attribute_vocabulary(max_values=3) == set()


def test_a_disliked_title_said_to_be_liked_falls_back(parts, tiny_dataset):
    """The quote constraint keeps a disliked title out of quotes, but the model may still name it bare: 'they liked
    <a title the user rated 1>' is a false claim about the user and gets the template fallback; the same title said
    to be watched passes."""
    rec = make_rec(parts, ScriptedBackend())
    h = rec.dataset_history("u2")
    liked = [e.item_id for e in h if e.liked]
    disliked = [e.item_id for e in h if e.liked is False and e.item_id not in liked]
    assert liked and disliked
    good_title, bad_title = title(tiny_dataset, liked[-1]), title(tiny_dataset, disliked[-1])
    r = make_rec(parts, ScriptedBackend(gen=f' "{good_title}" and {bad_title}, so these fit.')).recommend(
        "u2", k=4, explain=True)
    assert r.explanation_fallback is True and r.hallucinated == [] and r.explanation_grounded is True, r.explanation
    assert r.explanation_fallback_reasons == [f'says the user liked an item they rated low: "{bad_title}"']
    r2 = make_rec(parts, ScriptedBackend(gen=f' "{good_title}" and watched {bad_title}, so these fit.')).recommend(
        "u2", k=4, explain=True)
    assert r2.explanation_fallback is False, r2.explanation


def test_grounded_explanation_is_kept(parts, tiny_dataset):
    h = make_rec(parts).dataset_history("u2")
    liked = [e.item_id for e in h if e.liked]
    named = title(tiny_dataset, liked[-1])
    backend = ScriptedBackend(gen=f' "{named}", so these dramas fit well.\n"The Midnight Llama" on a new line.')
    r = make_rec(parts, backend).recommend("u2", k=4, explain=True)
    assert r.explanation_fallback is False and r.hallucinated == []
    # explain v3: the prompt ends with the answer prefix naming the top item; the shown text continues it
    lead = f'"{r.items[0].title}" suits this user because they liked'
    assert backend.generated[-1].endswith("Explanation: " + lead)
    assert r.explanation == f'{lead} "{named}", so these dramas fit well.'
    assert backend.lead_quote is True and backend.frequency_penalties[-1] == RankingConfig().explain_frequency_penalty
    # structured evidence: the cited history item with the genres it shares with the top item (the text's subject)
    genres = {i: set(str(tiny_dataset.items.iloc[tiny_dataset.item_index[i]]["genres"]).split("|"))
              for i in (liked[-1], r.items[0].item_id)}
    assert r.evidence == [{"item_id": liked[-1], "title": named,
                           "shared": sorted(genres[liked[-1]] & genres[r.items[0].item_id])}]


def test_explanation_quotes_only_liked_titles_the_prompt_shows(parts, tiny_dataset):
    """Quotable: the liked titles among the history the prompt shows; by default only those sharing a genre with the
    recommended item explain v3's text is about: the top one, or when no listed liked title shares one with it, the
    best-ranked of the top 3 that does (then listed first and named by the answer prefix); all of them with
    `explain_relevant_titles: false` or when none shares one. A disliked title is listed but never quotable."""
    by_genre = tiny_dataset.items.groupby("genres")["item_id"].apply(list)
    a, b, c = (by_genre.iloc[j] for j in range(3))
    hist = [HistEvent(a[0], True, 5.0, 1), HistEvent(b[0], True, 5.0, 2), HistEvent(a[1], False, 1.0, 3),
            HistEvent(b[1], True, 4.0, 4)]
    liked = [a[0], b[0], b[1]]
    for recs, relevant, want in (([a[2], a[3], a[4]], True, [a[0]]),
                                 ([a[2], a[3], a[4]], False, liked),
                                 ([b[2], a[2], a[3]], True, [b[0], b[1]]),  # the text is about b[2]: its genre
                                 # c[0] shares none: the text is about a[2], the best-ranked one a liked title
                                 # supports, listed first in the prompt
                                 ([c[0], a[2], b[2]], True, [a[0]]),
                                 ([c[0], c[1], c[2]], True, liked)):  # nothing shares a genre: every liked title
        backend = ScriptedBackend(gen=" nice things.")
        make_rec(parts, backend, explain_relevant_titles=relevant).explain([hist], [recs])
        assert backend.quotable == [[title(tiny_dataset, i) for i in want]], (recs, relevant)
        assert all(f'"{title(tiny_dataset, i)}"' in backend.generated[-1] for i in liked + [a[1]])  # all listed
        subject = a[2] if recs[0] == c[0] and recs[1] == a[2] and relevant else recs[0]
        assert backend.generated[-1].endswith(f'Explanation: "{title(tiny_dataset, subject)}" suits this user '
                                              "because they liked")
        listed = backend.generated[-1].split("Recommended items:\n")[1].split("\n")[:3]
        assert [ln.split('"')[1] for ln in listed] == [title(tiny_dataset, i)
                                                      for i in [subject] + [x for x in recs if x != subject]]
    off = ScriptedBackend(gen=" nice things.")
    make_rec(parts, off, explain_quoted_titles=False).recommend("u2", k=4, explain=True)
    assert not hasattr(off, "quotable")


def test_explanation_prompt_adds_earlier_likes_when_the_recent_window_has_too_few(parts, tiny_dataset):
    """A harsh rater's last `history_len` events may hold no like: the explain prompt then also lists the most recent
    earlier liked items (before the window, oldest first), up to `explain_min_liked` likes in all, so the text has a
    liked title to cite; a window with enough likes is listed alone."""
    ids = [str(i) for i in tiny_dataset.item_ids[:14]]
    liked_early = {0, 1, 2}  # three likes before the window of 10
    hist = [HistEvent(i, n in liked_early or n == 13, 5.0 if n in liked_early or n == 13 else 1.0, n)
            for n, i in enumerate(ids)]  # window = events 4..13: one like (13)
    recs = [str(i) for i in tiny_dataset.item_ids[20:23]]
    cases = ((3, [ids[1], ids[2], ids[13]]),  # two earlier likes added: the most recent ones, 1 and 2
             (1, [ids[13]]),  # the window already holds one like
             (0, [ids[13]]))
    for min_liked, want in cases:
        backend = ScriptedBackend(gen=" nice things.")
        make_rec(parts, backend, explain_relevant_titles=False, explain_min_liked=min_liked).explain([hist], [recs])
        assert backend.quotable == [[title(tiny_dataset, i) for i in want]], min_liked
        prompt = backend.generated[-1].split("Recommended")[0]
        listed = [i for i in ids if f'"{title(tiny_dataset, i)}"' in prompt]
        assert listed == sorted(set(want) | set(ids[4:]), key=ids.index)  # oldest first, the window complete
    assert not [i for i in ids[:4] if f'"{title(tiny_dataset, i)}"' in backend.generated[-1].split("Recommended")[0]]


# ------------------------------------------------------------------------------------------------ 6. evaluations
def _tallrec_rows(outputs=("Yes.", "No.", "Yes.", "No.", "Yes.", "No.")):
    instr = 'Given the user\'s preference and unpreference, identify whether the user will like the target movie by ' \
            'answering "Yes." or "No.".'
    return [{"instruction": instr,
             "input": f'User Preference: "Action Story {n}"\nUser Unpreference: "Drama Story {n}"\n'
                      f'Whether the user will like the target movie "{"good" if o.startswith("Yes") else "bad"} {n}"?',
             "output": o} for n, o in enumerate(outputs)]


@pytest.fixture(scope="module")
def tallrec_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("tallrec") / "six.json"
    p.write_text(json.dumps(_tallrec_rows()))
    return p


def test_tallrec_eval_with_oracle_and_tiny_llm(parts, tallrec_file):
    from llmrec.ranking.evaluate import eval_yesno_tallrec, load_tallrec, tallrec_prompt

    rows = load_tallrec(tallrec_file)
    assert len(rows) == 6 and tallrec_prompt(rows[0]).endswith('"good 0"?\nAnswer:')

    def oracle(prompt, choices):
        assert list(choices) == [" Yes", " No"] and prompt.startswith("Given the user") and prompt.endswith("Answer:")
        return np.log([0.8, 0.2]) if '"good' in prompt else np.log([0.3, 0.7])

    m = eval_yesno_tallrec(ScriptedBackend(logits=oracle), tallrec_file, batch_size=4)
    assert m["n"] == 6 and m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["f1"] == 1.0
    flipped = eval_yesno_tallrec(ScriptedBackend(logits=lambda p, c: oracle(p, c)[::-1]), tallrec_file)
    assert flipped["auc"] == 0.0 and flipped["accuracy"] == 0.0

    real = eval_yesno_tallrec(parts.backend, tallrec_file, batch_size=4)
    assert real["n"] == 6 and 0.0 <= real["auc"] <= 1.0
    assert {"accuracy", "f1", "precision", "recall", "seconds"} <= set(real)
    assert real["source"] == str(tallrec_file)


def test_tallrec_export_round_trip(tiny_dataset, tmp_path):
    from llmrec.evaluation import yesno_subset
    from llmrec.ranking.evaluate import export_tallrec, load_tallrec

    rows = load_tallrec(export_tallrec(tiny_dataset, "test", tmp_path / "t.json", max_examples=6))
    ex = yesno_subset(tiny_dataset, "test", 6, 0)
    assert len(rows) == 6 == len(ex)
    assert [r["output"] for r in rows] == ["Yes." if lab else "No." for lab in ex["label"]]
    assert all(f'"{title(tiny_dataset, i)}"?' in r["input"] for r, i in zip(rows, ex["item_id"]))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda rows: rows[2].pop("output"), r"entry 2: field 'output' missing"),
        (lambda rows: rows[4].update(output="Maybe."), r"entry 4: field 'output' must be 'Yes\.' or 'No\.'.*Maybe"),
        (lambda rows: rows[1].update(input=None), r"entry 1: field 'input'"),
    ],
)
def test_tallrec_malformed_entries(tmp_path, mutate, match):
    from llmrec.ranking.evaluate import TallrecFormatError, load_tallrec

    rows = _tallrec_rows()
    mutate(rows)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(rows))
    with pytest.raises(TallrecFormatError, match=match):
        load_tallrec(p)


def test_tallrec_malformed_files(tmp_path):
    from llmrec.ranking.evaluate import TallrecFormatError, load_tallrec

    p = tmp_path / "x.json"
    p.write_text('[{"instruction": "a",\n "input": ')
    with pytest.raises(TallrecFormatError, match="line 2: invalid JSON"):
        load_tallrec(p)
    p.write_text('{"instruction": "a", "input": "b", "output": "Yes."}')
    with pytest.raises(TallrecFormatError, match="non-empty JSON list"):
        load_tallrec(p)
    with pytest.raises(TallrecFormatError, match="file not found"):
        load_tallrec(tmp_path / "missing.json")


def test_fallback_reason_counts_hand_computed():
    from llmrec.ranking.evaluate import fallback_reason_counts

    recs = [
        Recommendation("a", [], "ok text", False),
        Recommendation("b", [], "t", True, explanation_fallback_reasons=[
            'names a title outside the history and the recommendations, or an invented one: "X"',
            "cites no history item and no liked attribute"]),
        Recommendation("c", [], "t", True,
                       explanation_fallback_reasons=["cites no history item and no liked attribute"]),
        Recommendation("d", [], "t", True, explanation_fallback_reasons=[
            'says the user liked an item they rated low: "Heat (1995)"', 'says the user liked an item they rated '
            'low: "Heat (1995)"']),  # one user, one rule: counted once
    ]
    assert fallback_reason_counts(recs) == {
        "cites no history item and no liked attribute": 2,
        "names a title outside the history and the recommendations, or an invented one": 1,
        "says the user liked an item they rated low": 1}
    assert fallback_reason_counts(recs[:1]) == {}


def test_explanation_metrics_hand_computed():
    from llmrec.ranking.evaluate import explanation_metrics

    recs = [
        Recommendation("a", [], "the cat sat on the mat", False, [], explanation_grounded=True),
        # generated text grounded (named a liked title) but with an invented one: fell back
        Recommendation("b", [], "The CAT sat", True, ["The Midnight Llama"], explanation_grounded=True),
        Recommendation("c", [], "because you liked it", False, [], explanation_grounded=True),
        Recommendation("d", [], None, True, ["i9", "i10"], explanation_grounded=False),
    ]
    m = explanation_metrics(recs)
    # bigrams: a 5 (all new), b 2 (both seen in a), c 3 (new), d 0 -> 8 distinct / 10
    assert m["n"] == 4
    # grounding is the generated texts' (3 of 4), not the pass rate (2 of 4): the template shown for b is not
    # counted, b's own text is
    assert m["grounding_rate"] == pytest.approx(3 / 4)
    assert m["fallback_rate"] == pytest.approx(2 / 4)
    assert m["hallucination_rate"] == pytest.approx(2 / 4)
    assert m["mean_words"] == pytest.approx((6 + 3 + 4) / 3)  # of the texts shown: d has none (not 0 words)
    assert m["distinct_2"] == pytest.approx(8 / 10)
    assert m["names_recommended"] == 0.0  # a and c name no recommended item (they have none)
    assert explanation_metrics([Recommendation("x", [], "same words here", False, [])] * 2)["distinct_2"] == 0.5
    items = [RecItem("i1", "Heat (1995)", 1.0, 1), RecItem("i2", "Fargo (1996)", 0.5, 2)]
    named = [Recommendation("e", items, '"Fargo (1996)" suits this user because they liked "Alien (1979)".', False),
             Recommendation("f", items, 'Because the user liked "Alien (1979)".', False),
             Recommendation("g", items, 'Recommended "Heat (1995)" because ...', True)]  # fallback: not counted
    assert explanation_metrics(named)["names_recommended"] == pytest.approx(1 / 2)
    assert explanation_metrics(named[2:])["names_recommended"] is None
    # a title with a double quote in it is named as the prompt quotes it (escaped), not as the raw title
    odd = [RecItem("i3", 'Say "Hi" (1999)', 1.0, 1)]
    escaped = Recommendation("h", odd, '"Say \\"Hi\\" (1999)" suits this user because they liked "Heat".', False)
    assert explanation_metrics([escaped])["names_recommended"] == 1.0


def test_contamination_probe_memorizer_vs_shuffled_control():
    from llmrec.ranking.evaluate import contamination_probe

    titles = ["Silent Harbor Mystery (1994)", "Crimson Valley Echoes Tonight (1988)", "Paper Lantern Garden (2001)",
              "Broken Compass Rose (1994)", "Velvet Thunder (1975)", "Golden Orchard Winter Tale (2010)",
              "Solo (1980)"]
    years = ["1994", "1988", "2001", "1994", "1975", "2010", "1980"]
    ds = _fake_ds(titles, years)
    real = {re.sub(r" \(\d{4}\)$", "", t): y for t, y in zip(titles, years)}
    halves = {" ".join(t.split()[: max(1, len(t.split()) // 2)]): " ".join(t.split()[max(1, len(t.split()) // 2):])
              for t in real}

    def memorizer(prompt):
        m = re.fullmatch(r'The movie titled "(.+)', prompt)
        if m:
            return f'{halves[m.group(1)]}" is a film' if m.group(1) in halves else ' and more"'
        m = re.fullmatch(r'The movie "(.+)" was released in the year', prompt)
        assert m, prompt
        return f" {real[m.group(1)]}."

    backend = ScriptedBackend(gen=memorizer)
    out = contamination_probe(backend, ds, n=100, seed=3)
    assert out["n"] == 6  # "Solo" has one word
    assert out["title_completion_rate"] == 1.0 and out["shuffled_control_rate"] == 0.0
    assert out["year_accuracy"] == 1.0 and out["year_majority_baseline"] == pytest.approx(2 / 6)
    assert not any("Solo" in p for p in backend.generated)

    blank = contamination_probe(ScriptedBackend(gen=" something else"), ds, n=3, seed=0)
    assert blank["n"] == 3 and blank["title_completion_rate"] == 0.0 and blank["year_accuracy"] == 0.0


def test_build_recommender_with_instances(parts):
    from llmrec.ranking.factory import build_recommender

    backend = ScriptedBackend()
    rec = build_recommender(parts.ds, backend, adapter="/somewhere/my-lora", retriever=parts.retriever,
                            cfg=RankingConfig(n_candidates=5))
    assert rec.backend is backend and rec.retriever is parts.retriever and rec.adapter == "my-lora"
    r = rec.recommend("u1", k=2, explain=False)
    assert r.adapter == "my-lora" and r.backend == "scripted" and len(r.items) == 2
    assert len(labelled_titles(backend.scored[-1])) == 5


def test_eval_yesno_dataset_adds_metrics_at_the_validation_threshold(parts):
    """An uncalibrated scorer (every P(Yes) below 0.5, positives above negatives) gets F1 0 at 0.5 but accuracy and
    F1 1 at the threshold chosen on the validation rows, which lies between its two score levels."""
    from llmrec.ranking.evaluate import eval_yesno_dataset

    class Uncalibrated:
        def __init__(self):
            self.sizes = []

        def yesno_examples_probs(self, ex):
            self.sizes.append(len(ex))
            return 0.1 + 0.2 * ex["label"].to_numpy(dtype=float)

    sc = Uncalibrated()
    m = eval_yesno_dataset(sc, parts.ds, "test", None, 0, valid_examples=8)
    assert 0 < m["positive_rate"] < 1 and m["auc"] == 1.0 and m["f1"] == 0.0
    assert 0.1 < m["threshold_valid"] <= 0.3 and m["accuracy@t_valid"] == 1.0 and m["f1@t_valid"] == 1.0
    assert sc.sizes == [m["n"], m["valid_n"]] and m["valid_n"] <= 8
    plain = eval_yesno_dataset(Uncalibrated(), parts.ds, "test", None, 0)
    assert "threshold_valid" not in plain and plain["auc"] == 1.0


# ------------------------------------------------------------------------------------------------ 7. CLI
def test_cli_eval_yesno_file(parts, tallrec_file, tmp_path, capsys):
    from llmrec.cli import main

    out = tmp_path / "res" / "yesno.json"
    args = ["eval", "yesno", "--file", str(tallrec_file), "--model", str(parts.llm_dir), "--dtype", "float32",
            "--batch-size", "4"]
    assert main(args + ["--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["n"] == 6 and 0.0 <= m["auc"] <= 1.0 and m["adapter"] is None and "accuracy" in m
    assert "yes/no on" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "b", "output": "Perhaps"}]))
    assert main(args[:3] + [str(bad)] + args[4:]) == 1
    err = capsys.readouterr().err
    assert "llmrec: error:" in err and "entry 0: field 'output'" in err


def test_cli_eval_yesno_dataset_with_a_chosen_template(parts, tmp_path, monkeypatch, capsys):
    """`--template yesno=yesno_stats` renders the dataset's rows with that template (recorded in the output); a
    malformed value is a usage error naming the expected form."""
    from llmrec.cli import main

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    base = ["eval", "yesno", "--dataset", str(parts.ds.root), "--model", str(parts.llm_dir), "--dtype", "float32",
            "--max-examples", "6", "--batch-size", "6"]
    got = {}
    for extra, name in (([], "yesno"), (["--template", "yesno=yesno_stats"], "yesno_stats")):
        out = tmp_path / f"{name}.json"
        assert main(base + extra + ["--out", str(out)]) == 0
        got[name] = json.loads(out.read_text())
        assert got[name]["template"].startswith(f"{name} v") and got[name]["n"] == 6
        assert got[name]["valid_n"] > 0 and "f1@t_valid" in got[name]  # validation threshold by default
    assert "yesno_stats v" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(base + ["--template", "yesno_stats"])
    assert "expected TASK=NAME" in capsys.readouterr().err


def test_cli_eval_rank_defaults_to_the_hybrid_retriever_and_records_its_settings(parts, tmp_path, monkeypatch, capsys):
    """`llmrec eval rank` ranks over the product's default candidates (text + item-CF, fusion weight 4, as the
    service) and writes which retriever, weight, mode and backend produced its figures; other settings are recorded
    as given."""
    from llmrec.cli import main

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    base = ["eval", "rank", "--dataset", str(parts.ds.root), "--model", str(parts.llm_dir), "--dtype", "float32",
            "--max-users", "4", "--batch-size", "4"]
    got = {}
    for name, extra in (("default", []), ("text", ["--retriever", "text", "--retrieval-weight", "0",
                                                   "--listings", "2"])):
        out = tmp_path / f"{name}.json"
        assert main(base + extra + ["--out", str(out)]) == 0
        got[name] = json.loads(out.read_text())
        assert got[name]["n_users"] == 4 and 0.0 <= got[name]["ndcg@10"] <= 1.0
    assert (got["default"]["retriever"], got["default"]["retrieval_weight"]) == ("hybrid", 4.0)
    assert (got["text"]["retriever"], got["text"]["retrieval_weight"]) == ("text", 0.0)
    assert (got["default"]["listings"], got["text"]["listings"]) == (1, 2)
    assert got["default"]["mode"] == "verbalizer" and got["default"]["n_candidates"] == 20
    assert got["default"]["backend"].startswith("transformers:") and got["default"]["adapter"] is None
    printed = capsys.readouterr().out
    assert "with hybrid + verbalizer rerank, retrieval weight 4;" in printed
    assert "with text + verbalizer rerank, retrieval weight 0, 2 listings;" in printed


def test_cli_eval_yesno_on_a_4bit_base(parts, tallrec_file, tmp_path, monkeypatch):
    """`--load-in-4bit` scores on the nf4 base (what a QLoRA adapter was trained on); vLLM refuses the flag."""
    from llmrec.cli import main
    from llmrec.llm import transformers_backend

    seen = {}
    real = transformers_backend.load_causal_lm

    def spy(*a, **kw):
        m, tok = real(*a, **kw)
        seen["4bit"] = type(m.model.layers[0].self_attn.q_proj).__name__
        return m, tok

    monkeypatch.setattr(transformers_backend, "load_causal_lm", spy)
    out = tmp_path / "yesno4.json"
    args = ["eval", "yesno", "--file", str(tallrec_file), "--model", str(parts.llm_dir), "--batch-size", "6"]
    assert main(args + ["--load-in-4bit", "--dtype", "float32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert seen["4bit"] == "Linear4bit" and res["n"] == 6
    assert res["backend"].endswith(":4bit")  # the result names the 4-bit base it was scored on
    with pytest.raises(SystemExit, match="--load-in-4bit is for --backend transformers"):
        main(args + ["--load-in-4bit", "--backend", "vllm"])


def test_title_twins_hand_computed():
    from llmrec.data import title_twins

    got = title_twins(["1", "2", "3", "4"], ["Heat (1995)", " heat  (1995)", "Alien (1979)", "HEAT (1995)"])
    assert got == {"1": ("2", "4"), "2": ("1", "4"), "4": ("1", "2")}  # "3" has a title of its own
    assert title_twins(["a", "b"], ["A", "B"]) == {}


def _with_twin(ds, item: str, twin_of: str):
    """A shallow copy of `ds` in which `item` is listed under `twin_of`'s title (a catalogue duplicate)."""
    import copy

    out = copy.copy(ds)
    out.titles = ds.titles.copy()
    out.titles[ds.item_index[item]] = ds.titles[ds.item_index[twin_of]]
    return out


def test_candidates_skip_title_twins_of_seen_items_but_evaluation_keeps_the_id_protocol(parts, tiny_dataset):
    user = USERS[0]
    base = make_rec(parts)
    h = base.dataset_history(user, "test")
    by_id = [c for c, _ in base.candidates(h)]
    seen, twin = h[-1].item_id, by_id[0]  # the top candidate becomes the twin of a seen item
    ds2 = _with_twin(tiny_dataset, twin, seen)
    cfg = RankingConfig(n_candidates=8, max_prompt_tokens=512)
    rec2 = Recommender(ds2, parts.backend, parts.retriever, cfg)
    assert rec2.title_twins == {twin: (seen,), seen: (twin,)}
    got = [c for c, _ in rec2.candidates(h)]
    assert twin not in got and got[:7] == by_id[1:] and len(got) == 8  # the next retrieved item moves up
    assert [c for c, _ in rec2.candidates(h, exclude_seen_titles=False)] == by_id
    off = Recommender(ds2, parts.backend, parts.retriever, RankingConfig(n_candidates=8, max_prompt_tokens=512,
                                                                          exclude_seen_titles=False))
    assert [c for c, _ in off.candidates(h)] == by_id
    # recommendations never name it; the evaluation's full ranking still places it among the 8 candidates
    recs = rec2.recommend_batch([user], [h], k=8, explain=False)[0]
    assert twin not in [i.item_id for i in recs.items] and len(recs.items) == 8
    m = rec2.score_matrix([user], "test")
    top8 = {str(tiny_dataset.item_ids[j]) for j in np.argsort(-m[0], kind="stable")[:8]}
    assert top8 == set(by_id)


def test_collaborative_fallback_skips_title_twins(tiny_dataset):
    from llmrec.service.serving import CollaborativeFallback
    from llmrec.store.events import Event

    user = USERS[0]
    hist = tiny_dataset.history(user, before="all")
    events = [Event(user_id=user, item_id=str(i), type="rating", timestamp=int(t), value=float(r), liked=bool(lab))
              for i, r, t, lab in zip(hist["item_id"], hist["rating"], hist["timestamp"], hist["label"])]
    first = CollaborativeFallback(tiny_dataset).recommend(events, 5)[0]["item_id"]
    ds2 = _with_twin(tiny_dataset, first, events[0].item_id)
    got = [r["item_id"] for r in CollaborativeFallback(ds2).recommend(events, 5)]
    assert first not in got and len(got) == 5
    assert CollaborativeFallback(ds2, exclude_seen_titles=False).recommend(events, 5)[0]["item_id"] == first


def test_map_titles_resolves_a_shared_title_to_the_candidate_listed_under_it():
    titles = ["Heat (1995)", "Alien (1979)", "Heat (1995)"]  # m0 and m2: one film under two ids
    rec = Recommender(_fake_ds(titles), ScriptedBackend(), SimpleNamespace(), RankingConfig(n_candidates=2))
    assert rec.matcher.exact("Heat (1995)") == "m0"  # the title alone names the first id
    assert rec.map_titles("Heat (1995)\nAlien (1979)", ["m1", "m2"]) == ["m2", "m1"]
    assert rec.map_titles("Heat (1995)", ["m1"]) == [] and rec.last_generate_stats["unmapped"] == 1


def test_explanation_citing_a_seen_title_listed_under_two_ids_is_not_a_hallucination(parts, tiny_dataset):
    h = make_rec(parts).dataset_history("u2")
    ids = [str(i) for i in tiny_dataset.item_ids]
    liked = max((e.item_id for e in h if e.liked), key=ids.index)
    twin = next(i for i in ids if i not in {e.item_id for e in h})
    assert ids.index(twin) < ids.index(liked)  # so the matcher reads the shared title as `twin`, not the seen id
    ds2 = _with_twin(tiny_dataset, twin, liked)
    named = title(tiny_dataset, liked)
    backend = ScriptedBackend(gen=f' "{named}", so these fit well.')
    rec = Recommender(ds2, backend, parts.retriever, RankingConfig(n_candidates=8, max_prompt_tokens=512))
    assert rec.matcher.exact(named) == twin
    r = rec.recommend("u2", k=4, explain=True)
    assert twin not in [i.item_id for i in r.items]
    assert r.explanation_fallback is False and r.hallucinated == []
    assert r.explanation.endswith(f'"{named}".')  # the filler after the cited title is cut
    assert [e["item_id"] for e in r.evidence] == [liked]  # the id the user has, not the twin the title reads as


def test_attribute_fields_known_then_short_repeating_text_columns():
    from llmrec.ranking.recommender import attribute_fields

    n = 20
    items = pd.DataFrame({
        "item_id": [f"b{j}" for j in range(n)], "title": [f"Book {j}" for j in range(n)],
        "author": ["Frank Herbert", "Ursula K. Le Guin"] * 10,  # repeats: an attribute two books can share
        "genres": ["Science Fiction, Classics"] * n,
        "year": ["1965"] * 19 + ["unknown"],  # numeric but for one dirty value
        "pages": list(range(100, 100 + n)),  # numeric dtype
        "isbn": [f"978-{j:06d}" for j in range(n)],  # unique per item
        "description": ["a long blurb about the book, its plot, its author and why readers like it " * 2] * n,
        "series": [None] * n,  # empty
    })
    assert attribute_fields(items) == ["genres", "author"]


def test_author_is_a_whole_attribute_and_a_missing_value_none(tmp_path):
    titles = ["Dune", "Dune Messiah", "Earthsea", "Emma"]
    ds = _fake_ds(titles)
    ds.items["author"] = ["Frank Herbert", "Frank Herbert", "Ursula K. Le Guin", None]
    ds.items["genres"] = ["Science Fiction", "Science Fiction", "Fantasy, Classics", "Classics"]
    rec = Recommender(ds, ScriptedBackend(), SimpleNamespace(), RankingConfig())
    assert rec._attrs("m0") == ["Science Fiction", "Frank Herbert"]  # the column lists values with commas
    assert rec._attrs("m2") == ["Fantasy", "Classics", "Ursula K. Le Guin"] and rec._attrs("m3") == ["Classics"]
    assert rec.sharing_attributes(["m1", "m2", "m3"], ["m0"]) == {"m1"}
    only = Recommender(ds, ScriptedBackend(), SimpleNamespace(), RankingConfig(attribute_fields=["author"]))
    assert only._attrs("m0") == ["Frank Herbert"]
    with pytest.raises(ValueError, match=r"attribute_fields: \['writer'\] not among fake's item columns"):
        Recommender(ds, ScriptedBackend(), SimpleNamespace(), RankingConfig(attribute_fields=["writer"]))
    ds.items["genres"] = ["Fantasy", "Classics", "Fantasy Classics", "Classics"]  # ML-100K's style: lists at spaces
    assert Recommender(ds, ScriptedBackend(), SimpleNamespace(), RankingConfig())._attrs("m2")[:2] == [
        "Fantasy", "Classics"]
    ds.items["genres"] = ["Science Fiction", "Science Fiction", "Fantasy", "Classics"]  # one multi-word genre each
    assert Recommender(ds, ScriptedBackend(), SimpleNamespace(), RankingConfig())._attrs("m0")[0] == "Science Fiction"


def test_cli_recommend_in_process_table_and_json(parts, tmp_path, monkeypatch, capsys):
    """`llmrec recommend --explain` on a tiny model: the table with the explanation and its evidence, and `--json`
    the same answer in the service's response shape."""
    from llmrec.cli import main
    from llmrec.service.protocol import RecommendationResponse

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    base = ["recommend", "--dataset", str(parts.ds.root), "--user-id", "u2", "--k", "3", "--explain",
            "--model", str(parts.llm_dir), "--dtype", "float32"]
    assert main(base + ["--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["user_id"] == "u2" and [i["rank"] for i in body["items"]] == [1, 2, 3]
    seen = {e.item_id for e in make_rec(parts).dataset_history("u2")}
    assert not seen & {i["item_id"] for i in body["items"]} and body["explanation"]
    assert body["explanation_evidence"] and {e["item_id"] for e in body["explanation_evidence"]} <= seen
    RecommendationResponse(**body, history_version=0)  # the service's schema accepts it
    assert main(base) == 0
    table = capsys.readouterr().out
    assert body["items"][0]["title"] in table and "explanation" in table


@pytest.mark.parametrize("k", [0, -1])
def test_recommend_refuses_a_k_below_one(parts, k):
    """k <= 0 used to answer an empty list (0) or every candidate but the last (-1, a slice)."""
    rec = make_rec(parts, ScriptedBackend())
    with pytest.raises(ValueError, match=rf"k must be at least 1, got {k}"):
        rec.recommend("u2", k=k, explain=False)
    with pytest.raises(ValueError, match=rf"k must be at least 1, got {k}"):
        rec.recommend_batch(["u2", "u5"], k=k, explain=True)


@pytest.mark.parametrize("n", [1, 3])
def test_recommend_batch_refuses_histories_not_one_per_user(parts, n):
    """A shorter list raised a bare IndexError, a longer one was silently cut."""
    rec = make_rec(parts, ScriptedBackend())
    with pytest.raises(ValueError, match=rf"histories: {n} given for 2 users"):
        rec.recommend_batch(["u2", "u5"], histories=[None] * n, k=3, explain=False)


def test_explanation_of_a_recommended_item_with_a_long_title_is_not_a_hallucination(parts, tiny_dataset):
    """The explain prompt's answer prefix quotes the top item's title capped at `title_max_chars` (120); the post-check
    used to report that capped title as invented and always fall back for such an item."""
    import copy

    probe = make_rec(parts, ScriptedBackend()).recommend("u2", k=4, explain=False)
    top = probe.items[0].item_id
    ds2 = copy.copy(tiny_dataset)
    ds2.titles = tiny_dataset.titles.copy().astype(object)
    long_title = title(tiny_dataset, top) + " special edition" + " with many extra scenes and commentary" * 3
    assert len(long_title) > 120
    ds2.titles[tiny_dataset.item_index[top]] = long_title
    ds2.items = tiny_dataset.items.copy()
    ds2.items.loc[ds2.items.index[tiny_dataset.item_index[top]], "title"] = long_title
    h = make_rec(parts).dataset_history("u2")
    named = title(tiny_dataset, [e.item_id for e in h if e.liked][-1])
    backend = ScriptedBackend(gen=f' "{named}", so these dramas fit well.')
    rec = Recommender(ds2, backend, parts.retriever, RankingConfig(n_candidates=8, max_prompt_tokens=512))
    r = rec.recommend("u2", k=4, explain=True)
    assert r.items[0].item_id == top and r.items[0].title == long_title
    assert backend.generated[-1].endswith(f"Explanation: {quote(long_title)} suits this user because they liked")
    assert r.hallucinated == [] and r.explanation_fallback is False
    assert r.explanation == (f'{quote(long_title)} suits this user because they liked "{named}", so these dramas '
                             "fit well.")


# ------------------------------------------------------------------------------------------------ ranking review
def test_k_beyond_the_candidates_continues_in_retrieval_order_below_every_candidate(parts, tiny_dataset):
    """The full ranking is defined past the LLM-ranked candidates (the rest by retrieval score): a k larger than
    n_candidates used to answer n_candidates items only (the service allows k up to 100 against 20 candidates).
    The extra items follow in retrieval order, never a history item or a repeat, with scores below every candidate's
    (retrieval scores are not on the LLM's scale); a k beyond the catalogue answers every unseen item."""
    rec = make_rec(parts, ScriptedBackend())
    h = rec.dataset_history("u2")
    seen = {e.item_id for e in h}
    cands = [c for c, _ in rec.candidates(h)]
    more = [c for c, _ in rec.candidates(h, k=20)]
    r = rec.recommend("u2", k=20, explain=False)
    ids = [i.item_id for i in r.items]
    assert len(ids) == 20 and len(set(ids)) == 20 and not set(ids) & seen
    assert ids[:8] == cands[::-1]  # scripted: the last letter first
    assert ids[8:] == [c for c in more if c not in cands]
    scores = [i.score for i in r.items]
    assert all(a > b for a, b in zip(scores, scores[1:])) and all(np.isfinite(scores))
    assert [i.rank for i in r.items] == list(range(1, 21))
    unseen = [str(i) for i in tiny_dataset.item_ids if str(i) not in rec._with_twins(seen)]
    r = rec.recommend("u2", k=500, explain=False)
    assert sorted(i.item_id for i in r.items) == sorted(unseen)
    batch = rec.recommend_batch(["u2", "u5"], k=12, explain=False)  # per user, in a batch
    for b in batch:
        one = rec.recommend(b.user_id, k=12, explain=False)
        assert [i.item_id for i in b.items] == [i.item_id for i in one.items] and len(b.items) == 12


def test_candidates_never_hold_a_history_item_or_a_repeat_whatever_the_retriever_returns(parts):
    """A retriever (a plugged-in one, say) that ignores `exclude` or repeats an item: the history item was
    recommended back and the repeated one listed twice (two letters, two rows in the answer)."""
    rec = make_rec(parts, ScriptedBackend())
    h = rec.dataset_history("u2")
    good = [c for c, _ in rec.candidates(h)]
    leaky = SimpleNamespace(query=lambda hist, k, exclude: [(h[-1].item_id, 9.0), (good[0], 8.0), (good[0], 7.5)]
                            + [(c, 7.0 - j) for j, c in enumerate(good[1:])])
    rec2 = Recommender(parts.ds, ScriptedBackend(), leaky, rec.cfg)
    assert [c for c, _ in rec2.candidates(h)] == good
    ids = [i.item_id for i in rec2.recommend("u2", k=8, explain=False).items]
    assert sorted(ids) == sorted(good) and h[-1].item_id not in ids


def test_too_many_candidates_for_the_rank_templates_letters_are_named_as_the_setting(parts, caplog):
    """n_candidates above the `rank` template's 20 letters failed deep in prompt rendering, after retrieval, with a
    message naming no setting; now a warning at construction (pointwise and likelihood runs keep the default mode
    with more candidates) and, when ranking in verbalizer mode, an error naming n_candidates."""
    import logging

    with caplog.at_level(logging.WARNING, logger="llmrec.ranking.recommender"):
        rec = make_rec(parts, ScriptedBackend(), n_candidates=25)
    assert "n_candidates=25 exceeds the 20 labels" in caplog.text
    with pytest.raises(ValueError, match=r"RankingConfig.n_candidates=25 exceeds the 20 labels"):
        rec.recommend("u2", k=3, explain=False)
    assert rec.backend.scored == []
    rec = make_rec(parts, ScriptedBackend(), n_candidates=25, mode="generate")  # no letters: allowed
    assert len(rec.recommend("u2", k=3, explain=False).items) == 3
    with pytest.raises(ValueError, match=r"RankingConfig.n_candidates=25 exceeds the 20 labels"):
        rec.recommend("u2", k=3, explain=False, mode="verbalizer")


@pytest.mark.parametrize("written", ["as_is", "as_prompted", "listed"])
def test_map_titles_reads_titles_with_their_own_quotes_and_list_characters(written):
    """Last.fm titles `"Weird Al" Yankovic`, `Royce da 5'9"`, `The "K"`, `*NSYNC`: stripping every edge quote and a
    leading `*` as a list marker left no title to match, so the line was dropped as unmapped."""
    titles = ['"Weird Al" Yankovic', "Royce da 5'9\"", 'The "K"', "*NSYNC", "Sigur Rós", "Heat"]
    retriever = SimpleNamespace(similar_texts=lambda line, texts: np.zeros(len(texts)))
    rec = Recommender(_fake_ds(titles), ScriptedBackend(), retriever, RankingConfig(n_candidates=5))
    cands = ["m0", "m1", "m2", "m3", "m4"]
    form = {"as_is": str, "as_prompted": quote, "listed": lambda t: f"- {quote(t)}"}[written]
    for j, t in enumerate(titles[:5]):
        assert rec.map_titles(form(t), cands) == [f"m{j}"], form(t)
    text = "\n".join(form(t) if written == "listed" else f"{n + 1}. {form(t)}" for n, t in enumerate(titles[:5][::-1]))
    rec.last_generate_stats = {"lines": 0, "mapped": 0, "unmapped": 0}
    assert rec.map_titles(text, cands) == cands[::-1]
    assert rec.last_generate_stats == {"lines": 5, "mapped": 5, "unmapped": 0}


def test_prompts_list_the_most_recent_catalogue_items_when_newer_ones_are_unknown(parts, tiny_dataset):
    """An event-store history whose latest events are items outside the catalogue: the prompt listed the
    `history_len` most recent events, then skipped the unknown ones, so it showed '(none)' and the LLM ranked for a
    cold-start user; the explanation prompt likewise counted unseen likes toward `explain_min_liked`."""
    known = [{"item_id": f"i{j}", "type": "rating", "value": 5, "timestamp": 1000 + j} for j in (0, 4, 8)]
    new = [{"item_id": f"new{j}", "type": "rating", "value": 5, "timestamp": 2000 + j} for j in range(10)]
    backend = ScriptedBackend(gen=" nice things.")
    rec = make_rec(parts, backend)
    r = rec.recommend("u2", k=3, explain=True, history=known + new)
    prompt = backend.scored[-1].split("Candidate items:")[0]
    assert all(f'"Action Story {j}" (liked)' in prompt for j in (0, 4, 8)), prompt
    explain_prompt = backend.generated[-1].split("Recommended")[0]
    assert all(f'"Action Story {j}"' in explain_prompt for j in (0, 4, 8))
    assert len(r.items) == 3


def test_non_finite_llm_scores_are_a_backend_error_not_a_ranking(parts):
    """A backend that returns NaN (a bf16/fp16 overflow) gave a ranking in arbitrary order and a response no JSON
    encoder writes; it is a BackendError, which the service answers with its labelled fallback."""
    from llmrec.llm.base import BackendError

    nan = ScriptedBackend(logits=lambda p, c: np.full(len(c), np.nan))
    with pytest.raises(BackendError, match=r"non-finite candidate scores"):
        make_rec(parts, nan).recommend("u2", k=3, explain=False)
    ok = make_rec(parts, ScriptedBackend()).recommend("u2", k=3, explain=False)
    assert len(ok.items) == 3 and all(np.isfinite(it.score) for it in ok.items)


@pytest.mark.parametrize("mode", ["verbalizer", "likelihood"])
def test_non_finite_llm_scores_are_refused_by_evaluation_too(parts, mode):
    """`score_matrix` (what `eval rank` and the bench measure) ranked NaN LLM scores silently: every candidate tied at
    NaN kept its retrieval order, so a broken backend was reported as the LLM's metrics (those of retrieval alone)."""
    from llmrec.llm.base import BackendError

    class NanBackend(ScriptedBackend):
        def score_continuations(self, prompts, continuations):
            return np.full((len(prompts), len(continuations[0])), np.nan), np.ones((len(prompts),
                                                                                    len(continuations[0])))

    nan = NanBackend(logits=lambda p, c: np.full(len(c), np.nan))
    with pytest.raises(BackendError, match=r"non-finite candidate scores"):
        make_rec(parts, nan, mode=mode).score_matrix(["u2", "u5"])
    m = make_rec(parts, ScriptedBackend(), mode="verbalizer").score_matrix(["u2", "u5"])
    assert m.shape == (2, parts.ds.n_items) and np.isfinite(m).all()


def test_an_event_history_lists_each_item_once_with_the_users_latest_reaction(parts):
    """A store history holds an event per view, click, purchase or rating: the prompt listed "Action Story 4" three
    times and "Action Story 0" twice, once (liked) and once (disliked); the explanation then cited "Action Story 0" as
    a title the user liked although their latest rating of it was 1/5 (the quote constraint allowed it)."""
    backend = ScriptedBackend(gen=' "Action Story 0" and more.')
    rec = make_rec(parts, backend)
    h = [{"item_id": "i0", "type": "rating", "value": 5, "timestamp": 1},
         {"item_id": "i8", "type": "rating", "value": 5, "timestamp": 2},
         {"item_id": "i4", "type": "view", "timestamp": 3},
         {"item_id": "i4", "type": "purchase", "liked": True, "timestamp": 4},
         {"item_id": "i8", "type": "view", "timestamp": 5},
         {"item_id": "i0", "type": "rating", "value": 1, "timestamp": 6}]
    r = rec.recommend("x", k=3, explain=True, history=h)
    for prompt in (backend.scored[-1], backend.generated[-1]):
        lines = [x for x in prompt.splitlines() if x.startswith('- "Action Story ') and "(" in x]
        assert lines[:3] == ['- "Action Story 4" (liked)', '- "Action Story 8" (liked)',
                             '- "Action Story 0" (disliked)'], prompt
    quotable = [q.strip('"') for q in backend.quotable[-1]]  # what the explanation may cite as liked
    assert "Action Story 0" not in quotable and {"Action Story 4", "Action Story 8"} <= set(quotable), quotable
    assert len(r.items) == 3
    from llmrec.ranking.recommender import latest_per_item

    assert [(e.item_id, e.liked, e.rating, e.timestamp) for e in latest_per_item(to_hist_events(h))] == [
        ("i4", True, None, 4), ("i8", True, 5, 5), ("i0", False, 1, 6)]
    assert rec.score_yesno("x", ["i12"], history=h) == rec.score_yesno("x", ["i12"], history=[h[2], h[3], h[1], h[5]])


def test_a_user_who_has_seen_every_item_gets_no_items_and_no_explanation(parts, tiny_dataset):
    """A history covering the catalogue leaves nothing to recommend: the answer was `items: []` with the explanation
    "" (an empty string, not flagged as a fallback), as if a text had been generated and shown; now None, as without
    --explain. Fewer unseen items than k (and than the candidates) answer every unseen one; the batch is per user."""
    backend = ScriptedBackend(gen=' "Action Story 0".')
    rec = make_rec(parts, backend)
    every = [{"item_id": str(i), "type": "rating", "value": 5, "timestamp": n}
             for n, i in enumerate(tiny_dataset.item_ids)]
    all_but_3 = every[3:]
    full, few, dup = rec.recommend_batch(["a", "b", "b"], [every, all_but_3, all_but_3], k=10, explain=True)
    assert full.items == [] and full.explanation is None and full.evidence == [] and not full.explanation_fallback
    assert sorted(i.item_id for i in few.items) == sorted(str(i) for i in tiny_dataset.item_ids[:3])
    assert few.explanation and [i.item_id for i in dup.items] == [i.item_id for i in few.items]
    assert dup.explanation == few.explanation
