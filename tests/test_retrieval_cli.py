"""`llmrec retrieve` and `llmrec prompt` on the tiny dataset (MiniLM encoder, whitespace tokenizer)."""

from __future__ import annotations

import re

import pytest

from llmrec.cli import main

pytest.importorskip("sentence_transformers")
pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def twins_dataset(tmp_path_factory):
    """The tiny dataset with catalogue duplicates: item i{j + 24} is listed under i{j}'s title (j < 24)."""
    import pandas as pd
    from conftest import make_tiny_csv

    from llmrec.data import PrepareConfig, load_prepared, prepare

    root = tmp_path_factory.mktemp("twins_home")
    tpath, ipath = make_tiny_csv(root)
    items = pd.read_csv(ipath)
    items.loc[24:47, "title"] = items["title"].iloc[:24].to_numpy()
    items.to_csv(ipath, index=False)
    prepare(str(tpath), PrepareConfig(items_file=str(ipath), name="twins", n_sampled_negatives=20), home=root)
    return load_prepared("twins", home=root)


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


def test_prompt_of_all_events_leaves_out_title_twins_of_seen_items(twins_dataset, home, capsys):
    """--split all lists the candidates `llmrec recommend` gives: an item listed under the title of one the user has
    seen is no candidate (it was, when seen items were left out by id only)."""
    from llmrec.data import title_twins, with_title_twins
    from llmrec.ranking.factory import DEFAULT_RETRIEVER, build_retriever

    ds, user = twins_dataset, "u2"
    h = ds.history(user, before="all")
    seen = set(h["item_id"].astype(str))
    seen_titles = {str(ds.titles[ds.item_index[i]]) for i in seen}
    twins = with_title_twins(seen, title_twins(list(ds.item_ids), list(ds.titles))) - seen
    hq = [(str(i), bool(lab), int(t)) for i, lab, t in zip(h["item_id"], h["label"], h["timestamp"])]
    by_id = [i for i, _ in build_retriever(ds, DEFAULT_RETRIEVER).query(hq, k=6, exclude=seen)]
    assert set(by_id) & twins  # by id alone, a seen film's twin would be listed
    args = ["prompt", "--dataset", str(ds.root), "--user", user, "--tokenizer", "whitespace", "--split", "all",
            "--template", "rank", "--k", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    listed = re.findall(r'^[A-F]\. "([^"]+)"', out.split("Candidate items:")[1], re.M)
    assert len(listed) == 6 and not set(listed) & seen_titles, out
    # the retriever reads the whole history, as the Recommender does, not the events the prompt shows (--history)
    assert main(args + ["--history", "2"]) == 0
    assert re.findall(r'^[A-F]\. "([^"]+)"', capsys.readouterr().out.split("Candidate items:")[1], re.M) == listed


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_retrieve_leaves_out_title_twins_of_seen_items(twins_dataset, home, capsys, mode):
    """`llmrec retrieve --user` left out the seen items by id only: an item listed under a seen film's title (the
    text retriever's nearest neighbour of it) was shown as unseen, though recommend and the service leave it out."""
    from llmrec.data import title_twins, with_title_twins

    ds, user = twins_dataset, "u2"
    h = ds.history(user, before="test")
    seen = set(h["item_id"].astype(str))
    twins = with_title_twins(seen, title_twins(list(ds.item_ids), list(ds.titles))) - seen
    assert twins
    k = ds.n_items - len(seen) - len(twins)  # every unseen item but the twins fits; by id alone twins were listed
    assert main(["retrieve", "--dataset", str(ds.root), "--user", user, "--k", str(k), "--mode", mode,
                 "--split", "test"]) == 0
    rows = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if re.match(r"\s*\d+\s+i\d+\s", ln)]
    assert len(rows) == k and not set(rows) & (seen | twins), rows


def test_prompt_yesno_without_a_target_is_a_usage_error(tiny_dataset, home, capsys):
    args = ["prompt", "--dataset", str(tiny_dataset.root), "--user", "u2", "--tokenizer", "whitespace",
            "--template", "yesno", "--split", "all"]
    from llmrec.cli.args import UsageError

    with pytest.raises(UsageError, match="the yesno template needs --item"):  # exit status 2 from `llmrec`
        main(args)
    assert "llmrec prompt: error: the yesno template needs --item" in capsys.readouterr().err
