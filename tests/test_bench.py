"""`llmrec bench` end to end on the tiny dataset: the five baselines with fast settings, the text retriever, a tiny
Llama zero-shot and with a LoRA adapter ("llm tuned"). Checks the report's structure, that every number in it is a
finite computed value (some recomputed independently here), the markdown table against the JSON, the PNG plots, the
explanation examples, the goals and verbalizer-vs-generate sections, and the CLI with `--set` overrides."""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("faiss")
pytest.importorskip("peft")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.bench import RANK_KEYS, THRESHOLD_KEYS, YESNO_KEYS, BenchConfig, run_bench  # noqa: E402
from llmrec.evaluation import evaluate_ranking, evaluate_yesno, ranking_targets, yesno_subset  # noqa: E402
from llmrec.metrics import auc, ndcg_at_k, paired_bootstrap_ratio, ranking_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINES = ["pop", "mf", "bpr", "bert_lstm", "sasrec"]
FAST = {
    "mf": {"epochs": 5, "dim": 8, "lr": 0.05, "batch_size": 256, "patience": 5},
    "bpr": {"epochs": 4, "dim": 8, "lr": 0.05, "batch_size": 128, "eval_every": 2, "patience": 2},
    "bert_lstm": {"epochs_yesno": 2, "epochs_next": 2, "patience": 2, "eval_every_next": 1, "proj": 16, "hidden": 16,
                  "like_dim": 4, "batch_size": 64, "seq_batch_size": 16, "seq_len": 12, "neg_samples": 16},
    "sasrec": {"epochs": 3, "hidden": 16, "blocks": 1, "max_len": 16, "batch_size": 16, "eval_every": 1,
               "patience": 3},
}
RANK_USERS = 6
YESNO_EXAMPLES = 40
YESNO_VALID = 30
EXPLANATIONS = 2
RETRIEVAL_ROW = "retrieval (text)"
CHANCE_ROW = RETRIEVAL_ROW + ", candidates in random order (expected)"  # a reranker's chance level


def md_fmt(v) -> str:
    """The number format of `llmrec.bench_utils.md_table`."""
    return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"


def walk_numbers(obj, path="$"):
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk_numbers(v, f"{path}[{i}]")


def make_adapter(llm_dir: Path, out: Path) -> Path:
    """A LoRA adapter (r=4 on q_proj, v_proj) for the tiny Llama, without training: lora_B gets small random values
    (instead of PEFT's zeros) so the tuned model actually differs from the base one."""
    from llmrec.bench_utils import random_lora_adapter

    random_lora_adapter(llm_dir, out, seed=1, r=4, target_modules=["q_proj", "v_proj"], std=0.05)
    assert (out / "adapter_config.json").is_file()
    return out


@pytest.fixture(scope="module")
def bench(tiny_dataset, tiny_home, tmp_path_factory):
    from llmrec.baselines.text import default_bert_path

    try:
        default_bert_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("bench")
    llm_dir = make_tiny_llm(root / "llm")
    adapter = make_adapter(llm_dir, root / "tuned" / "adapter")
    results = root / "results"
    cfg = BenchConfig(
        dataset="tiny",
        baselines=list(BASELINES),
        baseline_overrides=FAST,
        rank_users=RANK_USERS,
        yesno_examples=YESNO_EXAMPLES,
        yesno_valid_examples=YESNO_VALID,
        model=str(llm_dir),
        adapter_yesno=str(adapter),
        adapter_rank=str(adapter),
        adapter_title=str(adapter),
        n_candidates=10,
        retriever="text",
        dtype="float32",
        explanations=EXPLANATIONS,
        results_dir=str(results),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMREC_HOME", str(tiny_home))
        # the zero-shot table is read from the global results folder: point it at an empty one (hermetic)
        mp.setattr("llmrec.bench.RESULTS_DIR", root / "global_results")
        (root / "global_results").mkdir(exist_ok=True)
        (root / "global_results" / "zeroshot.json").write_text(json.dumps(
            {"created": "2026-01-02T03:04:05+00:00",
             "table": [{"domain": "d", "method": "LLM base", "auc": 0.5, "p_yes": [0.25, 0.75]}]}))
        path = run_bench(cfg, command="llmrec bench --dataset tiny (test)")
        yield SimpleNamespace(cfg=cfg, path=path, data=json.loads(path.read_text()),
                              md=path.with_suffix(".md").read_text(), results=results, llm_dir=llm_dir,
                              adapter=adapter, ds=tiny_dataset)


def test_report_header_and_methods(bench):
    d = bench.data
    assert bench.path == bench.results / "bench_tiny.json"
    assert bench.path.with_suffix(".md").is_file()
    for key in ("dataset", "commit", "machine", "command", "methods"):
        assert key in d, key
    assert d["dataset"] == "tiny"
    assert d["command"] == "llmrec bench --dataset tiny (test)"
    assert isinstance(d["commit"], str) and d["commit"]
    assert isinstance(d["machine"], str) and "Python" in d["machine"]
    llm_rows = []
    for label in ("llm zero-shot", "llm tuned"):  # "<row>, LLM order only" when the fusion weight is not 0
        for row in (label, f"{label}, title likelihood"):  # the verbalizer's rows, then the likelihood mode's
            llm_rows += [f"{row}, LLM order only"] if d["fusion"][row]["selected"] != 0.0 else []
        llm_rows += [f"{label}, title likelihood", label]
    assert list(d["methods"]) == [*BASELINES, RETRIEVAL_ROW, CHANCE_ROW, *llm_rows]
    assert d["config"]["rank_users"] == RANK_USERS and d["config"]["baseline_overrides"] == FAST
    assert d["notes"] == []  # a tuned adapter was given: no "no tuned adapter" note
    # the zero-shot table is copied as it was when the bench ran, and says from when (it may be re-measured since);
    # its per-row P(Yes) lists stay in zeroshot.json
    assert d["zeroshot"] == [{"domain": "d", "method": "LLM base", "auc": 0.5}]
    assert "p_yes" not in bench.md and "[0.25, 0.75]" not in bench.md
    assert d["zeroshot_created"] == "2026-01-02T03:04:05+00:00"
    assert "a copy of eval/results/zeroshot.json as created 2026-01-02T03:04:05+00:00" in bench.md
    assert "| d | LLM base | 0.5000 |" in bench.md


def test_every_number_is_finite_and_in_range(bench):
    methods = bench.data["methods"]
    for name, row in methods.items():
        for k in RANK_KEYS:
            assert isinstance(row[k], float) and 0.0 <= row[k] <= 1.0, (name, k, row.get(k))
        assert row["hr@10"] == pytest.approx(row["recall@10"])  # one target per user
        assert row["mrr@10"] <= row["ndcg@10"] + 1e-12 and row["ndcg@10"] <= row["hr@10"] + 1e-12
        assert row["rank_s_per_user"] > 0, name
        if "train_s" in row:
            assert row["train_s"] > 0, name
        if name in BASELINES:
            for k in RANK_KEYS:
                assert 0.0 <= row[f"all_users_{k}"] <= 1.0
    # Yes/No metrics where the method has them: MF, BERT+LSTM and both LLM rows; not pop/bpr/sasrec/retrieval
    with_yesno = {n for n, r in methods.items() if "auc" in r}
    assert with_yesno == {"mf", "bert_lstm", "llm zero-shot", "llm tuned"}
    for name in with_yesno:
        for k in YESNO_KEYS:
            assert isinstance(methods[name][k], float) and 0.0 <= methods[name][k] <= 1.0, (name, k)
        for k in THRESHOLD_KEYS[1:]:  # accuracy / F1 at the validation-chosen threshold
            assert isinstance(methods[name][k], float) and 0.0 <= methods[name][k] <= 1.0, (name, k)
        assert -0.01 < methods[name]["t_valid"] < 1.01, name  # within the scores' range (+/- 1e-9 at the ends)
    assert not any(k in r for r in methods.values() if "auc" not in r for k in THRESHOLD_KEYS)
    for name in ("llm zero-shot", "llm tuned"):
        assert methods[name]["yesno_s_per_example"] > 0
    assert methods["llm zero-shot"]["rank_adapter"] is None and methods["llm zero-shot"]["yesno_adapter"] is None
    assert methods["llm tuned"]["rank_adapter"] == str(bench.adapter)
    assert methods["llm tuned"]["yesno_adapter"] == str(bench.adapter)
    # an adapter without llmrec_prompt.json (or a run recipe) is rendered with the task's own template
    assert methods["llm zero-shot"]["yesno_template"] == methods["llm tuned"]["yesno_template"] == "yesno"
    assert bench.data["seconds"] > 0
    bad = [(p, v) for p, v in walk_numbers(bench.data) if not math.isfinite(v)]
    assert not bad, bad


def test_protocol_states_the_shared_subsets(bench):
    ds, p = bench.ds, bench.data["protocol"]
    ex = yesno_subset(ds, "test", YESNO_EXAMPLES, 0)
    assert len(ex) == YESNO_EXAMPLES and 0 < ex["label"].mean() < 1  # both classes: AUC is defined
    assert f"full ranking over {ds.n_items} items" in p["next_item"]
    assert f"{RANK_USERS} users (seed 0)" in p["next_item"]
    assert f"all {len(ds.targets('test'))} users" in p["next_item"]
    assert f"fixed subset of {YESNO_EXAMPLES} (seed 0), positive rate {ex['label'].mean():.3f}" in p["yesno"]
    assert f"fixed subset of {YESNO_VALID} validation examples (seed 0)" in p["yesno"]


def test_numbers_recomputed_independently(bench, tiny_home, monkeypatch):
    """pop (both user sets), the retrieval row and the zero-shot LLM's Yes/No metrics, recomputed here on the
    same seeded user subset / Yes/No examples, equal the report's."""
    from llmrec.baselines import get_model
    from llmrec.llm import load_backend
    from llmrec.metrics import best_threshold
    from llmrec.ranking import RankingConfig, Recommender
    from llmrec.ranking.evaluate import eval_rank
    from llmrec.ranking.factory import build_retriever

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    ds, methods = bench.ds, bench.data["methods"]
    pop = get_model("pop").fit(ds, progress=False)
    sub = evaluate_ranking(ds, lambda u: pop.score_items(list(u), "test"), max_users=RANK_USERS, seed=0)
    full = evaluate_ranking(ds, lambda u: pop.score_items(list(u), "test"))
    assert sub["user_subset"]["n"] == RANK_USERS
    for k in RANK_KEYS:
        assert methods["pop"][k] == sub[k], k
        assert methods["pop"][f"all_users_{k}"] == full[k], k

    retriever = build_retriever(ds, "text")
    r = eval_rank(Recommender(ds, None, retriever, RankingConfig(n_candidates=10)), ds, RANK_USERS, 0,
                  retrieval_only=True)
    for k in RANK_KEYS:
        assert methods[RETRIEVAL_ROW][k] == pytest.approx(r[k], abs=1e-12), k
    # chance: the target is among the 10 candidates for a fraction hr@10 of users, then at each rank w.p. 1/10
    ranks = np.arange(1, 11)
    assert methods[CHANCE_ROW]["hr@10"] == pytest.approx(r["hr@10"])
    assert methods[CHANCE_ROW]["ndcg@10"] == pytest.approx(r["hr@10"] * np.mean(1 / np.log2(ranks + 1)))
    assert methods[CHANCE_ROW]["mrr@10"] == pytest.approx(r["hr@10"] * np.mean(1 / ranks))

    ex = yesno_subset(ds, "test", YESNO_EXAMPLES, 0)
    backend = load_backend("transformers", model=str(bench.llm_dir), dtype="float32")
    ex_valid = yesno_subset(ds, "valid", YESNO_VALID, 0)
    try:
        rec = Recommender(ds, backend, retriever, RankingConfig(n_candidates=10))
        probs, valid_probs = rec.yesno_examples_probs(ex), rec.yesno_examples_probs(ex_valid)
    finally:
        backend.close()
    m = evaluate_yesno(probs, ex)
    for k in YESNO_KEYS:
        assert methods["llm zero-shot"][k] == pytest.approx(m[k], abs=1e-9), k
    # the threshold of best validation accuracy, applied to the test rows
    assert len(ex_valid) == YESNO_VALID and set(ex_valid["split"]) == {"valid"}
    t = best_threshold(ex_valid["label"].to_numpy(), valid_probs)
    assert methods["llm zero-shot"]["t_valid"] == pytest.approx(t, abs=1e-9)
    at_t = evaluate_yesno(probs, ex, threshold=t)
    assert methods["llm zero-shot"]["accuracy@t_valid"] == pytest.approx(at_t["accuracy"], abs=1e-9)
    assert methods["llm zero-shot"]["f1@t_valid"] == pytest.approx(at_t["f1"], abs=1e-9)


def test_fusion_weight_chosen_on_valid(bench):
    """Each LLM variant's retrieval_weight is the argmax of validation NDCG@10 over the grid (ties: the smaller)."""
    d = bench.data
    assert set(d["fusion"]) == {"llm zero-shot", "llm tuned", "llm zero-shot, title likelihood",
                                "llm tuned, title likelihood"}
    for label, f in d["fusion"].items():
        valid = {float(w): m for w, m in f["valid"].items()}
        assert sorted(valid) == sorted(bench.cfg.fusion_grid)
        best = max(valid, key=lambda w: (valid[w]["ndcg@10"], -w))
        assert f["selected"] == best == d["methods"][label]["retrieval_weight"]
        assert all(m["n_users"] == RANK_USERS for m in valid.values())
    md = (bench.path.parent / "ranking_tiny.md").read_text()
    assert "chosen on the **validation** split" in md


def test_best_goals_and_verbalizer_sections(bench):
    d, methods = bench.data, bench.data["methods"]
    for key in ("ndcg@10", "auc"):
        scored = {n: r[key] for n, r in methods.items() if key in r and n != CHANCE_ROW}
        assert d["best"][key] in scored and scored[d["best"][key]] == max(scored.values())
    assert set(d["goals"]) == {"ndcg@10", "auc", "verbalizer_speedup"}
    sp = d["goals"]["verbalizer_speedup"]
    assert sp["ratio"] == d["verbalizer_vs_generate"]["speedup"] and sp["met"] == (sp["ratio"] >= 20)
    for key, margin in (("ndcg@10", 1.15), ("auc", 1.05)):
        g = d["goals"][key]
        others = [r[key] for n, r in methods.items() if not n.startswith("llm") and key in r and n != CHANCE_ROW]
        tuned = g["tuned_name"]
        if key == "ndcg@10":  # the tuned mode of best validation NDCG@10 (verbalizer or title likelihood)
            valid = {n: d["fusion"][n]["valid"][str(d["fusion"][n]["selected"])]["ndcg@10"]
                     for n in ("llm tuned", "llm tuned, title likelihood")}
            assert valid[tuned] == max(valid.values())
        else:
            assert tuned == "llm tuned"
        assert g["tuned_llm"] == methods[tuned][key]
        assert g["best_other"] == max(others)
        assert g["ratio"] == pytest.approx(g["tuned_llm"] / g["best_other"])
        assert g["goal_ratio"] == margin and g["met"] == (g["tuned_llm"] >= margin * g["best_other"])
        assert methods[g["best_other_name"]][key] == g["best_other"]
        named = f" ({tuned})" if tuned != "llm tuned" else ""
        line = (f"- {key}: tuned LLM{named} {g['tuned_llm']:.4f} vs best other ({g['best_other_name']}) "
                f"{g['best_other']:.4f} = {g['ratio']:.2f}x (goal {margin}x): {'met' if g['met'] else 'NOT met'}")
        assert line in bench.md
        # the paired bootstrap interval: recomputed here from the per-row results the report keeps
        ci = g["ci"]
        if key == "ndcg@10":
            a, b = np.array(d["ranks"][tuned]), np.array(d["ranks"][g["best_other_name"]])
            ref = paired_bootstrap_ratio(lambda r: ndcg_at_k(r, 10), a, b, seed=bench.cfg.seed)
        else:
            y = np.array([r["label"] for r in d["yesno_rows"]], dtype=float)
            a = np.column_stack([y, d["yesno_probs"]["llm tuned"]])
            b = np.column_stack([y, d["yesno_probs"][g["best_other_name"]]])
            ref = paired_bootstrap_ratio(lambda m: auc(m[:, 0], m[:, 1]), a, b, seed=bench.cfg.seed)
        assert ci["n"] == len(a) and (ci["lo"], ci["hi"]) == pytest.approx((ref["lo"], ref["hi"]), abs=1e-4)
        assert ci["ratio"] == pytest.approx(g["ratio"], rel=1e-4) and ci["lo"] <= ci["hi"]
        assert f"{ci['lo']:.2f}-{ci['hi']:.2f}x over the same {ci['n']}" in bench.md
        if key == "ndcg@10":  # the tuned row validation did not pick, with its own test ratio and interval
            alt = g["runner_up"]
            assert alt["name"] in valid and alt["name"] != tuned
            assert (alt["valid"], alt["valid_picked"]) == (valid[alt["name"]], valid[tuned])
            assert alt["ratio"] == pytest.approx(methods[alt["name"]][key] / g["best_other"])
            ref = paired_bootstrap_ratio(lambda r: ndcg_at_k(r, 10), np.array(d["ranks"][alt["name"]]), b,
                                         seed=bench.cfg.seed)
            assert (alt["ci"]["lo"], alt["ci"]["hi"]) == pytest.approx((ref["lo"], ref["hi"]), abs=1e-4)
            assert (f". Not picked: {alt['name']} {alt['ratio']:.2f}x on test, 95% {alt['ci']['lo']:.2f}-"
                    f"{alt['ci']['hi']:.2f}x; validation NDCG@10 {alt['valid']:.4f} against the picked row's "
                    f"{valid[tuned]:.4f}") in bench.md
        else:
            assert "runner_up" not in g
    v = d["verbalizer_vs_generate"]
    assert v["users"] == min(bench.cfg.generate_users, RANK_USERS)
    # timed on the same users as generate (not the row's `rank_users` users); the row's figure is kept beside it
    assert v["verbalizer_s_per_user_rank_users"] == methods["llm zero-shot"]["rank_s_per_user"]
    assert v["verbalizer_s_per_user"] > 0 and 0 <= v["verbalizer_ndcg@10"] <= 1 and "same users" in v["timing"]
    assert v["generate_s_per_user"] > 0 and 0 <= v["generate_ndcg@10"] <= 1
    assert v["speedup"] == pytest.approx(v["generate_s_per_user"] / v["verbalizer_s_per_user"])
    assert isinstance(v["generate_mapping"], dict)
    assert (f"{v['verbalizer_s_per_user']:.2f} s/user vs {v['generate_s_per_user']:.2f} s/user "
            f"({v['speedup']:.1f}x; the same {v['users']} test users, each mode warmed up first)") in bench.md


def test_per_row_results_reproduce_the_table(bench):
    """The report keeps each method's per-user ranks and per-row P(Yes); they give the table's numbers back."""
    d, methods = bench.data, bench.data["methods"]
    users = ranking_targets(bench.ds, "test", RANK_USERS, bench.cfg.seed)["user_id"].tolist()
    assert d["rank_user_ids"] == users
    expected = {n for n, r in methods.items() if "ndcg@10" in r and n != CHANCE_ROW}
    assert set(d["ranks"]) == expected
    for name, rk in d["ranks"].items():
        assert len(rk) == RANK_USERS
        m = ranking_metrics(np.array(rk), ks=(10,))
        for k in RANK_KEYS:
            assert methods[name][k] == pytest.approx(m[k], abs=1e-12), (name, k)
    ex = yesno_subset(bench.ds, "test", YESNO_EXAMPLES, bench.cfg.seed)
    assert [r["user_id"] for r in d["yesno_rows"]] == ex["user_id"].tolist()
    assert set(d["yesno_probs"]) == {n for n, r in methods.items() if "auc" in r}
    for name, p in d["yesno_probs"].items():
        assert methods[name]["auc"] == pytest.approx(auc(ex["label"].to_numpy(), p), abs=1e-4), name


def test_ranking_report(bench):
    """ranking_<dataset>.json: retrieval, zero-shot, tuned and the best baseline of the same run, same numbers."""
    path = bench.path.parent / "ranking_tiny.json"
    r = json.loads(path.read_text())
    methods = bench.data["methods"]
    best = max((n for n in BASELINES), key=lambda n: methods[n]["ndcg@10"])
    llm_rows = {n for n in methods if n.startswith("llm")}
    assert {"llm zero-shot", "llm tuned"} <= llm_rows
    assert set(r["methods"]) == {RETRIEVAL_ROW, CHANCE_ROW, *llm_rows, f"best baseline: {best}"}
    for name, row in r["methods"].items():
        src = methods[name.removeprefix("best baseline: ")]
        assert row["ndcg@10"] == src["ndcg@10"] and row["recall@10"] == src["recall@10"]
    assert r["verbalizer_vs_generate"] == bench.data["verbalizer_vs_generate"]
    assert r["explanations"] == bench.data["explanations"]
    assert set(r["goals"]) == {"ndcg@10", "verbalizer_speedup"}
    md = path.with_suffix(".md").read_text()
    assert f"best baseline: {best}" in md and "verbalizer vs generate" in md


def test_explanations(bench):
    e = bench.data["explanations"]
    assert e["adapter"] == str(bench.adapter)  # the tuned run's explanations replace the zero-shot ones
    assert len(e["examples"]) == EXPLANATIONS
    users = set(bench.ds.user_ids)
    for x in e["examples"]:
        assert x["user_id"] in users
        assert isinstance(x["explanation"], str) and x["explanation"].strip()
        assert 1 <= len(x["items"]) <= 5 and all(t in set(bench.ds.titles) for t in x["items"])
        assert isinstance(x["fallback"], bool)
        line = f"- user {x['user_id']}: {', '.join(x['items'][:3])} — {x['explanation']}"
        assert line in bench.md
    m = e["metrics"]
    assert m["n"] == min(4 * EXPLANATIONS, len(bench.ds.user_ids))
    for k in ("grounding_rate", "hallucination_rate", "fallback_rate", "distinct_2"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["grounding_rate"] + m["fallback_rate"] == pytest.approx(1.0)
    assert m["mean_words"] > 0
    assert "## Explanations\n" + json.dumps(m) in bench.md


def test_markdown_table_matches_json(bench):
    md, methods = bench.md, bench.data["methods"]
    cols = ["method", *RANK_KEYS, *YESNO_KEYS, *THRESHOLD_KEYS, "train_s", "rank_s_per_user"]
    assert "| " + " | ".join(cols) + " |" in md
    for name, row in methods.items():
        lines = [ln for ln in md.splitlines() if ln.startswith(f"| {name} |")]
        assert len(lines) == 1, name
        cells = [c.strip() for c in lines[0].strip("|").split("|")]
        assert len(cells) == len(cols)
        for col, cell in zip(cols[1:], cells[1:]):
            assert cell == (md_fmt(row[col]) if col in row else ""), (name, col, cell)
    for header in ("- dataset: tiny", "- command: `llmrec bench --dataset tiny (test)`", "- commit: ", "- machine: "):
        assert header in md
    for bad in (r"\bnan\b", r"\binf\b", r"\bTODO\b", r"\bTBD\b", r"\bNone\b", r"placeholder", r"XXX"):
        assert not re.search(bad, md, re.I), bad


def test_plots_are_png(bench):
    plots = bench.data["plots"]
    assert plots == ["bench_tiny_metrics.png", "bench_tiny_roc.png", "bench_tiny_latency.png"]
    for p in plots:
        f = bench.results / p
        blob = f.read_bytes()
        assert len(blob) > 1000 and blob.startswith(PNG_MAGIC), p
        assert f"![{p}]({p})" in bench.md


def test_cli_bench_with_set_overrides(tiny_dataset, tiny_home, tmp_path, monkeypatch, capsys):
    """`llmrec bench --dataset tiny --set ...` (baselines only): the overrides reach BenchConfig and the models."""
    from llmrec.cli import main

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr("llmrec.bench.RESULTS_DIR", tmp_path / "global_results")
    argv = ["bench", "--dataset", "tiny", "--set", "llm=false", "baselines=[pop,mf]", "rank_users=5",
            "yesno_examples=30", "seed=3", "baseline_overrides.mf.epochs=2", "baseline_overrides.mf.dim=4",
            f"results_dir={tmp_path / 'out'}"]
    monkeypatch.setattr(sys, "argv", ["llmrec", *argv])
    assert main(argv) == 0
    d = json.loads((tmp_path / "out" / "bench_tiny.json").read_text())
    assert d["command"] == shlex.join(["llmrec", *argv])  # quoted as it can be typed again ('baselines=[pop,mf]')
    assert list(d["methods"]) == ["pop", "mf"]
    assert d["config"]["llm"] is False and d["config"]["seed"] == 3
    assert d["config"]["baseline_overrides"] == {"mf": {"epochs": 2, "dim": 4}}
    assert "5 users (seed 3)" in d["protocol"]["next_item"] and "fixed subset of 30 (seed 3)" in d["protocol"]["yesno"]
    assert d["goals"] == {} and "verbalizer_vs_generate" not in d and "explanations" not in d
    # the seed picks the user subset: pop recomputed on the seed-3 subset
    from llmrec.baselines import get_model

    pop = get_model("pop").fit(tiny_dataset, progress=False)
    sub = evaluate_ranking(tiny_dataset, lambda u: pop.score_items(list(u), "test"), max_users=5, seed=3)
    for k in RANK_KEYS:
        assert d["methods"]["pop"][k] == sub[k]
    out = capsys.readouterr().out
    assert "| pop |" in out and "| mf |" in out and "bench_tiny_metrics.png" in out


def test_generate_users_0_skips_the_generate_timing(bench, tiny_home, tmp_path, monkeypatch):
    """`generate_users=0` reached eval_rank as max_users=0, whose 0 means every user: generation over the whole
    split (hours on CPU). It now skips the verbalizer-vs-generate timing."""
    import llmrec.bench as B

    def must_not_run(*a, **k):
        raise AssertionError("generate timed with generate_users=0")

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr(B, "time_verbalizer_vs_generate", must_not_run)
    monkeypatch.setattr(B, "RESULTS_DIR", tmp_path / "global_results")
    cfg = replace(bench.cfg, baselines=["pop"], rank_modes=["verbalizer"], adapter_rank=None, generate_users=0,
                  explanations=0, fusion_grid=[], yesno_examples=10, yesno_valid_examples=0,
                  results_dir=str(tmp_path / "out"))
    d = json.loads(B.run_bench(cfg, command="test").read_text())
    assert "verbalizer_vs_generate" not in d and "llm zero-shot" in d["methods"]
