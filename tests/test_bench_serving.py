"""serve/bench_serving.py: the explanation workload it times is the service's own prompt, one per distinct user."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench_serving():
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "serve" / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_explain_prompts_are_the_explain_template_for_distinct_users(tiny_dataset):
    from llmrec.prompts import load_template

    bs = _bench_serving()
    prompts, source = bs.explain_prompts(6, ds=tiny_dataset)
    tpl = load_template("explain")
    assert source == f"prompts/explain.yaml v{tpl.version}"
    assert len(prompts) == 6 and len(set(prompts)) == 6
    titles = {str(t) for t in tiny_dataset.titles}
    for p in prompts:
        assert p.rstrip().endswith(tpl.answer_prefix)
        hist_part, rec_part = p.split("Recommended", 1)
        rec_titles = {t for t in titles if f'"{t}"' in rec_part.split("\n", 1)[1].split("In one or two")[0]}
        assert len(rec_titles) == 3
        assert not any(f'"{t}"' in hist_part for t in rec_titles)  # recommended items are outside the history
    assert bs.explain_prompts(6, ds=tiny_dataset)[0] == prompts  # seeded
    same, quotable, _ = bs.explain_prompts(6, ds=tiny_dataset, with_quotable=True)
    assert same == prompts and len(quotable) == 6
    for p, qs in zip(prompts, quotable):  # the quotable titles are liked history items the prompt lists
        hist_part = p.split("Recommended", 1)[0]
        assert qs and all(f'- "{q}"' in hist_part for q in qs)
        assert all(f'- "{q}" (genres' not in hist_part or "(disliked)" not in hist_part.split(f'- "{q}"')[1]
                   .split("\n")[0] for q in qs)
