"""eval/report.py: the README's headline block is read from the result files, not typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def report(load_script):
    return load_script("eval/report.py")


def _bench(tmp_path: Path) -> None:
    methods = {"mf": {"ndcg@10": 0.03, "hr@10": 0.05, "auc": 0.72, "rank_s_per_user": 0.0005},
               "sasrec": {"ndcg@10": 0.085, "hr@10": 0.175, "rank_s_per_user": 0.0015},
               "retrieval (sasrec)": {"ndcg@10": 0.085, "hr@10": 0.175, "rank_s_per_user": 0.002},
               "retrieval (text)": {"ndcg@10": 0.01},  # another retriever's row: not this run's candidates
               "llm tuned": {"ndcg@10": 0.0719, "hr@10": 0.15, "auc": 0.7632, "rank_s_per_user": 1.2345},
               "llm tuned, title likelihood": {"ndcg@10": 0.0929, "hr@10": 0.18, "rank_s_per_user": 0.5},
               "a method the headline leaves out": {"ndcg@10": 0.5}}
    goals = {"ndcg@10": {"ratio": 0.8459, "goal_ratio": 1.15, "met": False, "best_other_name": "sasrec",
                         "tuned_llm": 0.0719, "best_other": 0.085,
                         "tuned_name": "llm tuned, title likelihood",
                         "runner_up": {"name": "llm tuned", "ratio": 0.8459, "valid": 0.0807, "valid_picked": 0.0812,
                                       "ci": {"level": 0.95, "lo": 0.71, "hi": 0.98}}},
             "verbalizer_speedup": {"ratio": 21.04, "goal_ratio": 20.0, "met": True}}
    (tmp_path / "bench_ml-100k.json").write_text(json.dumps(
        {"methods": methods, "goals": goals, "rank_user_ids": ["1", "2", "3"], "yesno_rows": [0, 1],
         "machine": "2 x AMD EPYC, 24 GiB RAM, Python 3.11.7",
         "config": {"model": "/models/llama-1b", "retriever": "sasrec"},
         "command": "llmrec bench", "commit": "abc1234", "dataset": "ml-100k",
         "protocol": {"next_item": "leave-one-out", "yesno": "time split"}}))


def test_glance_reads_the_bench_and_explanation_results(report, tmp_path):
    assert "make bench" in report.glance(tmp_path)  # nothing measured yet: says how to measure
    _bench(tmp_path)
    text = report.glance(tmp_path)
    lines = text.splitlines()
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table == ["| method | NDCG@10 | HR@10 | Yes/No AUC | ms/user |",
                     "| MF | 0.0300 | 0.0500 | 0.7200 | 0.5 |",
                     "| SASRec | 0.0850 | 0.1750 |  | 1.5 |",
                     "| retrieval alone (sasrec: the LLM's candidates, in its order) | 0.0850 | 0.1750 |  | 2.0 |",
                     "| LLM, QLoRA-tuned | 0.0719 | 0.1500 | 0.7632 | 1,234.5 |",
                     "| LLM, QLoRA-tuned (next_title), title likelihood | 0.0929 | 0.1800 |  | 500.0 |"]
    assert ("leave-one-out test, 3 users), Yes/No by AUC on 2 time-split test rows; LLM /models/llama-1b, on "
            "2 x AMD EPYC.") in text
    assert ("- tuned LLM, title likelihood NDCG@10 = 0.85x the best baseline's (SASRec; goal 1.15x): **not met** "
            "(the tuned mode of better validation NDCG@10, by 0.0005; LLM, QLoRA-tuned: 0.85x)"
            in lines)  # the tuned row the bench chose on validation is named, and the other one beside it
    assert "- verbalizer ranking 21.0x faster per user than generating titles (goal 20x): met" in lines
    assert "- explanations" not in text and "explanations_ml-100k" not in text
    rows = [{"explanations": "free text", "n": 40, "fallback_rate": 0.9, "hallucination_rate": 0.025,
             "mean_words": 35.8, "s_per_user": 0.61},
            {"explanations": report.DEFAULT_EXPLANATIONS, "n": 40, "fallback_rate": 0.025, "hallucination_rate": 0.0,
             "mean_words": 17.4, "s_per_user": 0.654}]
    (tmp_path / "explanations_ml-100k.json").write_text(json.dumps({"rows": rows, "command": "python eval/e.py",
                                                                     "commit": "abc", "machine": "m"}))
    text = report.glance(tmp_path)
    assert ("- explanations (40 users, the default mode): template fallback 2%, hallucinated titles 0%, 17 words, "
            "0.65 s/user.") in text.splitlines()
    assert "`eval/results/bench_ml-100k.json` (`llmrec bench`, commit abc1234)" in text


def test_replace_rewrites_only_between_the_markers_and_names_missing_ones(report):
    text = f"intro\n{report.GLANCE_START}\nold\n{report.GLANCE_END}\nrest"
    assert report._replace(text, report.GLANCE_START, report.GLANCE_END, "new") == (
        f"intro\n{report.GLANCE_START}\nnew\n{report.GLANCE_END}\nrest")
    with pytest.raises(SystemExit, match="needs the markers"):
        report._replace("intro", report.START, report.END, "x")


def test_every_result_file_is_described(report):
    """A result file added without a line in RESULT_FILES would be missing from the README's index."""
    names = {p.stem for p in report.RESULTS.glob("*.json") if not p.stem.startswith("bench_")}
    assert names, "no result files found"
    assert sorted(names - set(report.RESULT_FILES)) == []


def test_section_has_the_bench_tables_and_an_index_of_the_other_results(report, tmp_path):
    _bench(tmp_path)
    head = {"command": "python x.py", "machine": "m"}
    (tmp_path / "zeroshot.json").write_text(json.dumps({"created": "2026-12-06T17:18:53+00:00", "commit": "abc",
                                                        **head}))
    (tmp_path / "serving.json").write_text(json.dumps({"commit": "def5678", **head}))  # no date: the commit stands in
    text = report.section(tmp_path)
    assert text.startswith("### Benchmark: ")
    assert "- goal ndcg@10: tuned LLM (llm tuned, title likelihood)" in text
    assert ("**not met**. Not picked: llm tuned 0.85x on test, 95% 0.71-0.98x; validation NDCG@10 0.0807 against "
            "the picked row's 0.0812\n") in text
    index = [ln for ln in text.splitlines() if ln.startswith("| [")]
    assert index == [  # RESULT_FILES' order; files absent from the folder are left out
        f"| [zeroshot](eval/results/zeroshot.md) | {report.RESULT_FILES['zeroshot']} | 2026-12-06 |",
        f"| [serving](eval/results/serving.md) | {report.RESULT_FILES['serving']} | def5678 |"]


# ------------------------------------------------------------------------------- a bad result file: named, loudly
@pytest.mark.parametrize("text, says", [
    ('{"created": "2026-12-06", "commit": "abc", "command": "x", "machine": "m", "auc": NaN}', "NaN is not JSON"),
    ('{"commit": "abc", "command": "x", "machine": "m", "auc": -Infinity}', "-Infinity is not JSON"),
    ('{"created": "2026-12-06", "commit": "abc"}', "no command, machine"),  # no header: "command `None`"
])
def test_section_refuses_a_result_file_that_is_not_strict_or_has_no_header(report, tmp_path, text, says):
    # before: NaN was read (Python's json accepts it) and quoted as "nan"; a file without its header was credited to
    # command `None`, commit None
    (tmp_path / "zeroshot.json").write_text(text)
    with pytest.raises(ValueError, match=f"zeroshot.json: .*{says}"):
        report.section(tmp_path)


@pytest.mark.parametrize("drop", ["protocol", "methods"])
def test_a_bench_file_without_a_key_is_named_not_a_key_error(report, tmp_path, drop):
    _bench(tmp_path)
    p = tmp_path / "bench_ml-100k.json"
    d = json.loads(p.read_text())
    del d[drop]
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"bench_ml-100k.json: no {drop}"):  # before: KeyError, no file named
        report.section(tmp_path)
    d = json.loads(p.read_text()) | {drop: {}}  # there, but without what is read from it
    d["goals"] = {"ndcg@10": {"met": False}}
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bench_ml-100k.json: malformed result file"):
        report.section(tmp_path)
    with pytest.raises(ValueError, match="bench_ml-100k.json: malformed result file"):
        report.glance(tmp_path)


def test_explanations_file_without_a_row_key_is_named(report, tmp_path):
    _bench(tmp_path)
    (tmp_path / "explanations_ml-100k.json").write_text(json.dumps(
        {"rows": [{"explanations": report.DEFAULT_EXPLANATIONS, "n": 4}], "command": "x", "commit": "a",
         "machine": "m"}))
    with pytest.raises(ValueError, match="explanations_ml-100k.json: malformed result file .*fallback_rate"):
        report.glance(tmp_path)


def test_main_names_the_bad_file_and_leaves_the_readme_alone(report, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    text = (f"a\n{report.GLANCE_START}\nold glance\n{report.GLANCE_END}\nb\n{report.START}\nold\n{report.END}\nc\n")
    readme.write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_ml-100k.json").write_text('{"methods": {}, "auc": NaN}')
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report.section, "__defaults__", (results,))
    monkeypatch.setattr(report.glance, "__defaults__", (results, "ml-100k"))
    with pytest.raises(SystemExit) as e:  # before: a traceback
        report.main()
    assert e.value.code == 1
    assert "bench_ml-100k.json: not strict JSON" in capsys.readouterr().err
    assert readme.read_text() == text


def test_replace_refuses_markers_twice_or_in_the_wrong_order(report):
    s, e = report.START, report.END
    for text in (f"{e}\nx\n{s}\n", f"{s}\nx\n{e}\n{s}\ny\n{e}\n"):  # before: ValueError unpacking / the first pair
        with pytest.raises(SystemExit, match="once each, in that order"):
            report._replace(text, s, e, "new")
