"""Train/serve skew: what a LoRA adapter is trained on (llmrec.finetune.data, the recipe) against what the same
adapter is scored and served on (llmrec.ranking: Recommender, factory.with_adapter_templates, the backends).

Each test fails when the two paths part: prompts, answers, candidate letters, history length, chat form, the template
(name, version, file), the prompt/answer token boundary, generate mode's prompt, a 4-bit base's quantization and the
like threshold of new ratings.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_fixtures import make_tiny_llm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_TOKENIZER = ROOT / "artifacts" / "models" / "smollm2-135m-instruct"


class _Stub:
    """A backend with a tokenizer and no model: `score_choices` records the prompts it is asked to score."""

    name = "stub"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.seen: list[str] = []

    def score_choices(self, prompts: list[str], choices: Any) -> np.ndarray:
        self.seen += list(prompts)
        k = len(choices) if choices and isinstance(choices[0], str) else len(choices[0])
        return np.zeros((len(prompts), k))


def _data(**kw: Any) -> Any:
    from llmrec.finetune.config import DataSettings

    base = {"n_train": 2, "n_valid": 8, "n_test": 8, "max_len": 900}
    return DataSettings(**{**base, **kw})


def _served_prompts(rec: Any, ds: Any, task: str, cfg: Any, split: str, examples: list) -> list[str]:
    """The prompts the Recommender scores for the training examples' own rows (valid/test: the same history)."""
    if task == "yesno":
        from llmrec.evaluation import yesno_subset

        rows = yesno_subset(ds, split, cfg.n_valid if split == "valid" else cfg.n_test, cfg.eval_seed)
        rec.backend.seen = []
        rec.yesno_examples_probs(rows)
        return list(rec.backend.seen)
    out = []
    for e in examples:
        h = rec.dataset_history(e.user_id, split)
        if task == "rank":
            out.append(rec._render("rank", h, candidates=rec._items(e.candidate_ids)).text)
        else:
            out.append(rec._render("next_title", h).text)
    return out


def _run_dir(tmp_path: Path, recipe: dict[str, Any], prompt: dict[str, Any] | None = None) -> Path:
    """<tmp>/run/{recipe.yaml, adapter/[llmrec_prompt.json]} as `llmrec finetune` leaves them (no weights)."""
    import yaml

    from llmrec.llm.loading import PROMPT_FILE

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if prompt is not None:
        (run / "adapter" / PROMPT_FILE).write_text(json.dumps(prompt))
    return run / "adapter"


# ------------------------------------------------------------------------------------------------ prompts and answers
@pytest.mark.parametrize("task,template", [("yesno", "yesno"), ("yesno", "yesno_estimate"), ("rank", "rank"),
                                          ("next_title", "next_title")])
def test_training_prompts_are_the_prompts_served_for_the_same_rows(tiny_dataset, task, template):
    """valid/test examples (their history is exactly what the Recommender reads for that split): the same prompt text,
    letters and answer strings, with the template the adapter records."""
    from llmrec.finetune.data import build_examples
    from llmrec.prompts.tokens import WhitespaceTokenizer
    from llmrec.ranking import RankingConfig, Recommender

    tok = WhitespaceTokenizer()
    cfg = _data(template=template)
    ex = build_examples(tiny_dataset, task, cfg, tok)
    rec = Recommender(tiny_dataset, _Stub(tok), None, RankingConfig(templates={task: template}))
    for split in ("valid", "test"):
        exs = ex[split]
        assert exs, split
        assert _served_prompts(rec, tiny_dataset, task, cfg, split, exs) == [e.prompt for e in exs], split
        for e in exs:
            if task == "rank":  # letters " A".." T" in the listed order, the target's letter the answer
                r = rec._render("rank", rec.dataset_history(e.user_id, split), candidates=rec._items(e.candidate_ids))
                assert r.choices == e.choices and r.candidate_ids == e.candidate_ids
                assert e.answer == r.choices[r.candidate_ids.index(e.item_id)]
            elif task == "next_title":  # the training answer is the continuation the likelihood mode scores
                assert rec._answer_titles([e.item_id]) == [e.answer]
            else:
                assert e.choices == list(rec.templates["yesno"].verbalizer.choices) == [" Yes", " No"]


def test_next_title_answer_cap_and_quote_are_the_scored_continuation(tiny_dataset, tmp_path):
    """A template with a short `title_max_chars`: the training answer (quoted, capped, one leading space) is the string
    the likelihood mode scores and the constrained `generate` mode decodes along, under the same template."""
    import yaml

    from llmrec.finetune.data import build_examples
    from llmrec.prompts.tokens import WhitespaceTokenizer
    from llmrec.ranking import RankingConfig, Recommender

    data = yaml.safe_load((ROOT / "prompts" / "next_title.yaml").read_text())
    data["options"]["title_max_chars"] = 10
    path = tmp_path / "next_title_short.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ex = build_examples(tiny_dataset, "next_title", _data(template=str(path), n_test=0), WhitespaceTokenizer())
    rec = Recommender(tiny_dataset, _Stub(None), None, RankingConfig(templates={"next_title": str(path)}))
    for e in ex["train"] + ex["valid"]:
        assert e.answer.startswith(' "') and e.answer.endswith('…"') and len(e.answer) == 13, e.answer
        assert rec._answer_titles([e.item_id]) == [e.answer]


def test_yesno_history_max_zero_lists_no_history(tiny_dataset):
    """`data.history_max: 0` is a recipe without history (rank / next_title: `tail(0)`); the Yes/No rows' `[-0:]`
    slice listed every event instead, so the run trained on full histories while recording history_max 0."""
    from llmrec.finetune.data import build_examples
    from llmrec.prompts import items_from_dataset, load_template, render
    from llmrec.prompts.tokens import WhitespaceTokenizer

    tok = WhitespaceTokenizer()
    for task in ("yesno", "rank", "next_title"):
        ex = build_examples(tiny_dataset, task, _data(history_max=0, n_valid=4, n_test=4), tok)
        t = load_template(task)
        for e in ex["train"] + ex["valid"]:
            kw: dict[str, Any] = ({"target": items_from_dataset(tiny_dataset, [e.item_id])[0]} if task == "yesno"
                                  else {"candidates": items_from_dataset(tiny_dataset, e.candidate_ids)}
                                  if task == "rank" else {})
            assert e.prompt == render(t, history=[], domain=tiny_dataset.domain, tokenizer=tok, **kw).text, task


# ------------------------------------------------------------------------------------------------ which template
def test_merged_model_is_served_with_its_training_template(tiny_dataset, tmp_path):
    """`llmrec export --merge` copies llmrec_prompt.json into the merged folder; a Recommender built on that folder
    (no adapter) must render with the adapter's template (yesno_stats), not the task's own (yesno)."""
    from llmrec.llm.loading import PROMPT_FILE
    from llmrec.ranking.factory import build_recommender

    merged = make_tiny_llm(tmp_path / "merged")
    (merged / PROMPT_FILE).write_text(json.dumps({"task": "yesno", "template": "yesno_stats"}))
    rec = build_recommender(tiny_dataset, "transformers", model=merged, retriever=object())
    assert rec.templates["yesno"].name == "yesno_stats"
    # a backend built first (the CLI's way): the template is read from the folder its model was loaded from
    rec2 = build_recommender(tiny_dataset, rec.backend, retriever=object())
    assert rec2.templates["yesno"].name == "yesno_stats"


def test_template_changed_since_training_is_reported(tmp_path, caplog):
    """llmrec_prompt.json records the template's version and hash: a prompts/<name>.yaml changed since (another hash)
    serves the adapter prompts it was not trained on, which must not pass silently."""
    from llmrec.prompts import load_template
    from llmrec.ranking.factory import adapter_templates

    t = load_template("yesno_stats")
    ok = _run_dir(tmp_path / "a", {"task": "yesno", "data": {"template": "yesno_stats"}},
                  {"task": "yesno", "template": "yesno_stats", "version": t.version, "hash": t.hash})
    with caplog.at_level(logging.WARNING, logger="llmrec.ranking.factory"):
        assert adapter_templates(ok) == {"yesno": "yesno_stats"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    old = _run_dir(tmp_path / "b", {"task": "yesno", "data": {"template": "yesno_stats"}},
                   {"task": "yesno", "template": "yesno_stats", "version": 1, "hash": "0" * 64})
    with caplog.at_level(logging.WARNING, logger="llmrec.ranking.factory"):
        assert adapter_templates(old) == {"yesno": "yesno_stats"}
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("yesno_stats" in m and "hash" in m for m in msgs), msgs


def test_template_file_given_by_path_is_the_one_served(tiny_dataset, tmp_path):
    """A recipe may name its template by YAML path (`data.template: my/rank.yaml`); llmrec_prompt.json records only
    the name inside it. A custom file that keeps `name: rank` was served the built-in prompts/rank.yaml."""
    import yaml

    from llmrec.prompts import load_template
    from llmrec.ranking import Recommender
    from llmrec.ranking.factory import adapter_templates, with_adapter_templates

    data = yaml.safe_load((ROOT / "prompts" / "rank.yaml").read_text())
    data["text"] = data["text"].replace("Which candidate", "Which one of these candidate")
    custom = tmp_path / "mine" / "rank_custom.yaml"
    custom.parent.mkdir(parents=True)
    custom.write_text(yaml.safe_dump(data, sort_keys=False))
    t = load_template(custom)
    assert t.name == "rank" and t.hash != load_template("rank").hash
    adapter = _run_dir(tmp_path, {"task": "rank", "data": {"template": str(custom)}},
                       {"task": "rank", "template": t.name, "version": t.version, "hash": t.hash})
    got = adapter_templates(adapter)
    assert load_template(got["rank"]).hash == t.hash
    rec = Recommender(tiny_dataset, _Stub(None), None, with_adapter_templates(None, adapter))
    assert rec.templates["rank"].hash == t.hash


# ------------------------------------------------------------------------------------------------ recipe settings
def test_recipe_history_max_is_the_served_history_length(tiny_dataset, tmp_path):
    """A run with `data.history_max: 3` learns from 3 history items; the Recommender (history_len 10 by default)
    served it 10 (yesno_stats' "liked N of their last M" counts them too)."""
    from llmrec.finetune.data import build_examples
    from llmrec.prompts.tokens import WhitespaceTokenizer
    from llmrec.ranking import Recommender
    from llmrec.ranking.factory import with_adapter_templates

    tok = WhitespaceTokenizer()
    for task, template in (("rank", "rank"), ("yesno", "yesno_stats"), ("next_title", "next_title")):
        cfg = _data(template=template, history_max=3)
        ex = build_examples(tiny_dataset, task, cfg, tok)
        adapter = _run_dir(tmp_path / task, {"task": task, "data": {"template": template, "history_max": 3,
                                                                     "chat": False, "n_candidates": 20}},
                           {"task": task, "template": template})
        rcfg = with_adapter_templates(None, adapter)
        assert rcfg.history_len == 3
        rec = Recommender(tiny_dataset, _Stub(tok), None, rcfg)
        for split in ("valid", "test"):
            assert _served_prompts(rec, tiny_dataset, task, cfg, split, ex[split]) == [e.prompt for e in ex[split]]


def test_explicit_history_len_is_kept_but_reported(tmp_path, caplog):
    from llmrec.ranking import RankingConfig
    from llmrec.ranking.factory import with_adapter_templates

    adapter = _run_dir(tmp_path, {"task": "rank", "data": {"template": "rank", "history_max": 3}})
    with caplog.at_level(logging.WARNING, logger="llmrec.ranking.factory"):
        assert with_adapter_templates(RankingConfig(history_len=6), adapter).history_len == 6
    assert any("history_max" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not (SMOLLM2_TOKENIZER / "tokenizer.json").is_file(), reason="embedded model not converted")
def test_recipe_chat_form_is_the_served_form(tiny_dataset, tmp_path):
    """`data.chat: true` trains on the tokenizer's chat form; RankingConfig.chat (default false) served plain text."""
    from transformers import AutoTokenizer

    from llmrec.finetune.data import build_examples
    from llmrec.ranking import Recommender
    from llmrec.ranking.factory import with_adapter_templates

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER))
    cfg = _data(template="yesno", chat=True, n_valid=4, n_test=4)
    ex = build_examples(tiny_dataset, "yesno", cfg, tok)
    assert ex["valid"][0].prompt.startswith("<|im_start|>")
    adapter = _run_dir(tmp_path, {"task": "yesno", "data": {"template": "yesno", "chat": True, "history_max": 10}},
                       {"task": "yesno", "template": "yesno"})
    rec = Recommender(tiny_dataset, _Stub(tok), None, with_adapter_templates(None, adapter))
    assert _served_prompts(rec, tiny_dataset, "yesno", cfg, "valid", ex["valid"]) == [e.prompt for e in ex["valid"]]


def test_rank_candidate_count_differing_from_training_is_reported(tmp_path, caplog):
    """An adapter trained on 10 letters (A..J) served 20 (A..T): the letters K..T were never an answer."""
    from llmrec.ranking import RankingConfig
    from llmrec.ranking.factory import with_adapter_templates

    adapter = _run_dir(tmp_path, {"task": "rank", "data": {"template": "rank", "n_candidates": 10}})
    with caplog.at_level(logging.WARNING, logger="llmrec.ranking.factory"):
        with_adapter_templates(RankingConfig(n_candidates=20), adapter)
    assert any("n_candidates" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmrec.ranking.factory"):
        with_adapter_templates(RankingConfig(n_candidates=10), adapter)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------ token boundary
@pytest.mark.skipif(not (SMOLLM2_TOKENIZER / "tokenizer.json").is_file(), reason="embedded model not converted")
def test_smollm2_prompt_answer_boundary(tiny_dataset):
    """SmolLM2's tokenizer: training's separately encoded prompt + answer are the ids of the whole text (so scoring
    the answer after the prompt reads the tokens the model would write), no BOS is added either way, and each
    scored choice's first token is the training answer's first token."""
    from transformers import AutoTokenizer

    from llmrec.finetune.data import build_examples, encode_example

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER))
    plain = tok("Answer:", add_special_tokens=False)["input_ids"]
    assert tok("Answer:", add_special_tokens=True)["input_ids"] == plain
    for task, template in (("yesno", "yesno_estimate"), ("rank", "rank"), ("next_title", "next_title")):
        ex = build_examples(tiny_dataset, task, _data(template=template, n_valid=6, n_test=0), tok)
        for e in ex["valid"]:
            f = encode_example(e, tok, 2048)
            p = tok(e.prompt, add_special_tokens=False)["input_ids"]
            a = tok(e.answer, add_special_tokens=False)["input_ids"]
            assert f["input_ids"] == p + a + [tok.eos_token_id]
            assert tok(e.prompt + e.answer, add_special_tokens=False)["input_ids"] == p + a, (task, e.answer)
            for c in e.choices:  # verbalizer: one token each, the training answer's token
                assert len(tok(c, add_special_tokens=False)["input_ids"]) == 1, c
            if e.choices:  # yesno: label 1 = the first choice (" Yes"); rank: the label is the choice's index
                k = (0 if e.label else 1) if task == "yesno" else e.label
                assert a[0] == tok(e.choices[k], add_special_tokens=False)["input_ids"][0]


def test_training_answer_logprob_is_the_served_score(tiny_dataset, tmp_path):
    """The tokens the loss reads are the tokens the backend scores: for a tokenizer that would add a BOS (a Llama-3
    style post-processor), the answer's log-prob from the training sequence (encode_example: prompt ids + answer ids)
    equals `score_continuations` (likelihood mode) and the first answer token's equals `score_choices` (yes/no)."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmrec.finetune.data import IGNORE_INDEX, build_examples, encode_example
    from llmrec.llm.transformers_backend import TransformersBackend

    d = make_tiny_llm(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(str(d))
    bos = tok.unk_token_id  # any special id: the point is that add_special_tokens=True would add it
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|unk|> $A",
                                                                  special_tokens=[("<|unk|>", bos)])
    assert tok("Answer:")["input_ids"][0] == bos
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    be = TransformersBackend.from_model(model, tok, batch_size=2)
    for task, template in (("next_title", "next_title"), ("yesno", "yesno")):
        ex = build_examples(tiny_dataset, task, _data(template=template, history_max=2, n_valid=3, n_test=0), tok)
        for e in ex["valid"]:
            f = encode_example(e, tok, 1024)
            assert f["input_ids"][0] != bos
            ids = torch.tensor([f["input_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            lab = torch.tensor(f["labels"][1:])
            on = (lab != IGNORE_INDEX).nonzero()[:, 0][:-1]  # the answer's tokens, EOS left out (as scored)
            train_lp = float(lp[on, lab[on]].sum())
            if task == "next_title":
                sums, counts = be.score_continuations([e.prompt], [[e.answer, ' "Other Story"']])
                assert counts[0, 0] == len(on)
                assert sums[0, 0] == pytest.approx(train_lp, abs=1e-3)
            else:
                first = int(on[0])
                choice_ids = [be.first_token_id(c) for c in e.choices]
                assert f["input_ids"][first + 1] == choice_ids[0 if e.label else 1]  # label 1 = " Yes", listed first
                want = torch.log_softmax(model(ids).logits[0, first, choice_ids].float(), -1).detach().numpy()
                np.testing.assert_allclose(be.score_choices([e.prompt], [e.choices])[0], want, atol=1e-4)


# ------------------------------------------------------------------------------- generate, history 0, 4-bit, ratings
def test_generate_mode_prompt_is_the_next_title_training_prompt(tiny_dataset, tmp_path):
    """`generate` rendered the next_title template with a candidate list, which the next_title recipe never trains
    with. A next_title adapter's run now serves it without the list (constrained decoding still writes only
    candidates); free-text generation keeps the list (it is how it knows what it may write), with a warning."""
    from llmrec.finetune.data import build_examples
    from llmrec.prompts.tokens import WhitespaceTokenizer
    from llmrec.ranking import RankingConfig, Recommender
    from llmrec.ranking.factory import with_adapter_templates

    tok = WhitespaceTokenizer()
    ex = build_examples(tiny_dataset, "next_title", _data(template="next_title", n_test=0), tok)
    adapter = _run_dir(tmp_path, {"task": "next_title", "data": {"template": "next_title", "history_max": 10}})
    e = ex["valid"][0]

    def served(cfg: RankingConfig) -> list[str]:
        rec = Recommender(tiny_dataset, _Stub(tok), None, cfg)
        seen: list[str] = []
        rec.backend.generate_from = lambda prompts, options, n: seen.extend(prompts) or [[] for _ in prompts]
        rec.backend.generate = lambda prompts, **kw: seen.extend(prompts) or ["" for _ in prompts]
        rec._rank_generate([rec.dataset_history(e.user_id, "valid")], [[("i1", 1.0), ("i2", 0.5)]])
        return seen

    tuned = with_adapter_templates(RankingConfig(mode="generate"), adapter)
    assert tuned.generate_list_candidates is False and served(tuned) == [e.prompt]
    assert served(RankingConfig(mode="generate")) != [e.prompt]  # zero-shot: the candidates are listed
    free = with_adapter_templates(RankingConfig(mode="generate", generate_constrained=False), adapter)
    assert free.generate_list_candidates is True and served(free) != [e.prompt]


def test_recommender_history_len_zero_lists_no_history(tiny_dataset):
    from llmrec.prompts.tokens import WhitespaceTokenizer
    from llmrec.ranking import RankingConfig, Recommender

    rec = Recommender(tiny_dataset, _Stub(WhitespaceTokenizer()), None, RankingConfig(history_len=0))
    h = rec.dataset_history(str(tiny_dataset.interactions["user_id"].iloc[0]), "test")
    assert rec._render("next_title", h).n_history == 0


def test_4bit_serving_quantizes_as_the_adapter_was_trained(tmp_path, monkeypatch):
    import llmrec.llm.transformers_backend as tb
    from llmrec.llm.loading import QuantSettings, write_adapter_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_adapter_base(adapter, QuantSettings(load_in_4bit=True, quant_type="fp4", double_quant=False), "float32")
    got: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_load(model: Any, dtype: str = "fast", quant: Any = None, **_: Any) -> Any:
        got.update(dtype=dtype, quant=quant)
        raise Stop

    monkeypatch.setattr(tb, "load_causal_lm", fake_load)
    monkeypatch.setattr(tb, "load_dequantized_4bit", lambda *a, **k: fake_load(*a[:1], **k))
    with pytest.raises(Stop):
        tb.TransformersBackend(model=tmp_path, adapter=adapter, dtype="bfloat16", load_in_4bit=True)
    assert got["quant"].quant_type == "fp4" and got["quant"].double_quant is False and got["dtype"] == "float32"


def test_service_marks_new_ratings_by_the_dataset_like_rule(tmp_path):
    """A dataset prepared with like_threshold=4 trains adapters on "rated 4 = disliked"; the service marks a new
    4/5 rating (event store, `to_hist_events`) by its own like_threshold (3.0): liked."""
    from conftest import make_tiny_csv

    from llmrec.data import PrepareConfig, load_prepared, prepare
    from llmrec.prompts.tokens import WhitespaceTokenizer
    from llmrec.ranking.recommender import to_hist_events
    from llmrec.service import launch
    from llmrec.service.config import ServiceConfig

    tpath, ipath = make_tiny_csv(tmp_path)
    prepare(str(tpath), PrepareConfig(items_file=str(ipath), name="tiny4", like_threshold=4.0), home=tmp_path)
    ds = load_prepared("tiny4", home=tmp_path)
    assert ds.manifest["like_threshold"] == 4.0
    rec = launch.build_recommenders(ServiceConfig(dataset="tiny4", retriever="itemcf"), ds,
                                    {None: _Stub(WhitespaceTokenizer())})[None]
    ev = to_hist_events([{"item_id": "i1", "type": "rating", "value": 4.0}], rec.cfg.like_threshold)
    assert ev[0].liked is False
