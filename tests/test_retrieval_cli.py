"""`llmrec retrieve` and `llmrec prompt` on the tiny dataset (MiniLM encoder, whitespace tokenizer)."""

from __future__ import annotations

import re

import pytest

from llmrec.cli import main

pytest.importorskip("sentence_transformers")
pytest.importorskip("faiss")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_HOME", str(tmp_path))
    return tmp_path


def test_retrieve_prints_titles_and_scores(tiny_dataset, home, capsys):
    assert main(["retrieve", "--dataset", str(tiny_dataset.root), "--user", "u1", "--k", "7"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r"\s*\d+\s+i\d+\s+-?\d\.\d{4}\s+\w+ Story \d+$", ln)]
    assert len(rows) == 7 and "top 7 unseen item items for user u1" in out
    seen = set(tiny_dataset.history("u1", before="all")["item_id"])
    assert not {ln.split()[1] for ln in rows} & seen
    assert (home / "cache" / "embeddings").is_dir() and (home / "cache" / "indexes").is_dir()
    assert main(["retrieve", "--dataset", str(tiny_dataset.root), "--user", "u1", "--k", "5", "--mode", "hybrid"]) == 0
    assert "(hybrid," in capsys.readouterr().out
    assert main(["retrieve", "--dataset", str(tiny_dataset.root), "--user", "nobody"]) == 1
    assert "unknown user 'nobody'" in capsys.readouterr().err


def test_prompt_prints_render_and_token_count(tiny_dataset, home, capsys):
    args = ["prompt", "--dataset", str(tiny_dataset.root), "--user", "u2", "--tokenizer", "whitespace"]
    assert main(args + ["--template", "rank", "--k", "6"]) == 0
    out = capsys.readouterr().out
    assert "Candidate items:" in out and "\nF. " in out and "\nG. " not in out and out.count("Answer:") == 1
    m = re.search(r"template rank v\d+: (\d+) tokens", out)
    assert m and int(m.group(1)) == len(out.split("\n\n== template")[0].split())
    assert main(args + ["--template", "yesno"]) == 0
    out = capsys.readouterr().out
    tgt = tiny_dataset.targets("test").set_index("user_id").loc["u2", "item_id"]
    title = tiny_dataset.titles[tiny_dataset.item_index[tgt]]
    assert f'Will the user enjoy the item "{title}"' in out
    assert main(args + ["--template", "rank", "--max-tokens", "150"]) == 0
    assert re.search(r"\d+ history items kept, [1-9]\d* dropped", capsys.readouterr().out)


def test_prompt_tokenizer_must_be_a_local_folder(tiny_dataset, home, tmp_path, capsys):
    args = ["prompt", "--dataset", str(tiny_dataset.root), "--user", "u2", "--template", "yesno", "--tokenizer"]
    assert main(args + ["org/not-a-folder"]) == 1  # a hub name: refused, nothing fetched
    assert "local tokenizer folder" in capsys.readouterr().err
    assert main(args + [str(tmp_path)]) == 1  # a folder without a tokenizer
    assert "cannot load a tokenizer" in capsys.readouterr().err


def test_recommend_and_eval_refuse_bad_input_before_loading_a_model(tiny_dataset, home, tmp_path, monkeypatch, capsys):
    import json

    import llmrec.cli.recommend as rc

    def no_model(args):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(rc, "_backend", no_model)
    assert main(["recommend", "--dataset", str(tiny_dataset.root), "--user-id", "nobody"]) == 1
    assert "unknown user 'nobody'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "i", "input": "x", "output": "Yes."},
                               {"instruction": "i", "input": "y", "output": "Maybe."}]))
    assert main(["eval", "yesno", "--file", str(bad)]) == 1
    assert "entry 1: field 'output'" in capsys.readouterr().err
