"""Build a ready `Recommender` from names and paths (used by the CLI, the service and the eval runners)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmrec.ranking.recommender import RankingConfig, Recommender

log = logging.getLogger(__name__)


# `text`; `hybrid[:cf]` = text + a collaborative model by RRF; a collaborative model alone (`sasrec`, `bert_lstm`:
# e.g. the best baseline's candidates for the LLM to rerank); `ensemble`: several of them fused by RRF.
# Collaborative models here can rank any history.
COLLABORATIVE = ("itemcf", "sasrec", "bert_lstm")
RETRIEVERS = ("text", "hybrid", "hybrid:itemcf", "hybrid:sasrec", "hybrid:bert_lstm", "itemcf", "sasrec", "bert_lstm",
              "ensemble")
# `ensemble`: model -> RRF weight. SASRec's weight 2 (against 0.5, 1 and 4) had the best validation Recall@20 and
# NDCG@20 on ML-100K (eval/results/retrieval_ml-100k.md); on test the fused list beats either model alone (Recall@20
# 0.280 vs 0.253). Chosen on ML-100K only: another dataset deserves its own `python eval/retrieval.py` run.
ENSEMBLE_WEIGHTS: dict[str, float] = {"bert_lstm": 1.0, "sasrec": 2.0}
# what the product answers with unless told otherwise (`llmrec recommend` / `eval rank`, the service): text + item-CF
# needs no trained model (fitted in seconds) and puts the test item in the top 20 for 23% of ML-100K users against
# 7% for the text retriever alone (eval/results/retrieval_ml-100k.md); `hybrid:sasrec` is better (26%) once SASRec is
# trained. The fusion weight 4 sits between what the ML-100K validation split chose for SmolLM2-135M zero-shot (2)
# and tuned (8) (eval/results/ranking_ml-100k.md); a stronger LLM deserves a smaller one.
DEFAULT_RETRIEVER = "hybrid"
DEFAULT_RETRIEVAL_WEIGHT = 4.0
# (text, collaborative) RRF weights per collaborative model, chosen on the ML-100K validation split
# (eval/retrieval.py; ML-1M's validation split preferred 0.1 for SASRec, by 0.002 Recall@20 over 0.25)
HYBRID_WEIGHTS: dict[str, tuple[float, float]] = {"itemcf": (0.5, 1.0), "sasrec": (0.25, 1.0),
                                                  "bert_lstm": (0.25, 1.0)}


def collaborative_name(kind: str) -> str | None:
    """The collaborative model a retriever kind uses: `hybrid` / `hybrid:itemcf` / `itemcf` -> itemcf,
    `hybrid:sasrec` / `sasrec` -> sasrec (likewise bert_lstm), `text` -> None."""
    if kind.startswith("hybrid"):
        return kind.partition(":")[2] or "itemcf"
    return kind if kind in COLLABORATIVE else None


def collaborative_model(ds: Any, name: str = "itemcf", fit_if_missing: bool = True) -> Any:
    """The collaborative side of a hybrid retriever: `itemcf` (fitted here, seconds) or a baseline (`sasrec`, ...)
    loaded from its checkpoint (`llmrec baselines train`), else fitted on the training split and saved there."""
    if name == "itemcf":
        from llmrec.retrieval.cf import ItemCF

        return ItemCF().fit(ds)
    from llmrec.baselines import load_or_fit

    return load_or_fit(name, ds, fit_if_missing)[0]


def build_retriever(ds: Any, kind: str = "text", model_path: str | None = None, cf_model: Any = None,
                    fitted: dict[str, Any] | None = None) -> Any:
    """`text`: sentence-transformer retriever over item texts; `hybrid` (= `hybrid:itemcf`): fused by RRF with
    item-to-item CF; `hybrid:sasrec`: fused with a SASRec model instead (text weight 0.25, chosen on the validation
    split in eval/retrieval.py; `hybrid:bert_lstm` likewise); `itemcf`: item-to-item CF alone (no
    sentence-transformer: for data without item texts, or a machine without the encoder); `sasrec` / `bert_lstm`:
    that baseline's ranking alone (its checkpoint, else fitted now; the text encoder only maps generated titles);
    `ensemble`: the models of `ENSEMBLE_WEIGHTS` fused by weighted RRF (likewise). `fitted` (name -> model): models
    the caller fitted on the same split (the bench's baselines), used instead of checkpoints; `cf_model` replaces
    the one collaborative model of a single-model kind."""
    from llmrec.retrieval import EnsembleRetriever, ModelRetriever, TextRetriever

    if kind not in RETRIEVERS:
        raise ValueError(f"unknown retriever {kind!r}: use one of {', '.join(RETRIEVERS)}")
    fitted = fitted or {}

    def model(name: str) -> Any:
        if cf_model is not None and kind != "ensemble":
            return cf_model
        return fitted[name] if name in fitted else collaborative_model(ds, name)

    if kind == "itemcf":
        return model("itemcf")
    text = TextRetriever(model_path=model_path)
    text.build(ds)
    if kind == "text":
        return text
    if kind == "ensemble":
        return EnsembleRetriever([model(m) for m in ENSEMBLE_WEIGHTS], list(ENSEMBLE_WEIGHTS.values()), text=text)
    if kind in COLLABORATIVE:
        return ModelRetriever(model(kind), text)
    from llmrec.retrieval import HybridRetriever

    cf_name = collaborative_name(kind) or "itemcf"
    return HybridRetriever(text, model(cf_name), weights=HYBRID_WEIGHTS.get(cf_name, (0.5, 1.0)))


def adapter_recipe(adapter: str | Path | None) -> dict[str, Any]:
    """The `data` block of the finetune run an adapter folder comes from (`<run>/recipe.yaml` beside `<run>/adapter`,
    as `llmrec finetune` writes them), with the run's `task` added; {} when there is none (a merged model, an
    adapter from elsewhere)."""
    if not adapter:
        return {}
    p = Path(adapter)
    r = p.parent / "recipe.yaml"
    if p.name != "adapter" or not r.is_file():
        return {}
    import yaml

    d = yaml.safe_load(r.read_text()) or {}
    if not isinstance(d, dict):
        return {}
    data = d.get("data") or {}
    return {**(data if isinstance(data, dict) else {}), "task": d.get("task")}


def _template_trained(where: Path, name: str, want_hash: str | None, version: Any, recipe_template: Any) -> str:
    """What the Recommender should load for the template recorded as `name` (hash `want_hash`) in `where`: `name`
    when prompts/<name>.yaml is still that template; the run's `data.template` file when the recipe named one by
    path (llmrec_prompt.json records only the name inside it); otherwise `name`, with a warning: the adapter is then
    served prompts it was not trained on."""
    if not want_hash:  # written before hashes were recorded: nothing to compare
        return name
    import llmrec.prompts as prompts_api
    from llmrec.finetune.data import resolve_template
    from llmrec.prompts import load_template

    tried: list[str] = []
    for ref in dict.fromkeys([name, *([str(recipe_template)] if recipe_template else [])]):
        try:
            t = resolve_template(prompts_api, ref)
        except (OSError, ValueError) as e:  # a file gone, or no longer a valid template (ConfigError)
            tried.append(f"{ref!r}: {e}")
            continue
        if t.hash == want_hash:
            return name if ref == name else str(t.path)
        tried.append(f"{ref!r} is v{t.version}, hash {t.hash[:12]}")
    try:
        load_template(name)
    except (OSError, ValueError):
        return name  # the Recommender refuses it with the message naming the missing template
    log.warning("%s was trained on prompt template %r v%s (hash %s), which is no longer what it names (%s): it will "
                "be served prompts it was not trained on; retrain it, or restore that template under another name "
                "and pass it in RankingConfig.templates", where, name, version, want_hash[:12], "; ".join(tried))
    return name


def adapter_templates(adapter: str | Path | None) -> dict[str, str]:
    """{task: template name or file} an adapter (or a model merged from one) was trained with: `llmrec_prompt.json`
    in its folder (written by `llmrec finetune`; its recorded hash is checked against the template now under that
    name, and a recipe that named its template by path gets that file), else the run's `recipe.yaml` next to it; {}
    when neither exists (a base model or an adapter from elsewhere: the task's own template is used)."""
    from llmrec.llm.loading import PROMPT_FILE

    if not adapter:
        return {}
    p = Path(adapter)
    f = p / PROMPT_FILE
    recipe = adapter_recipe(p)
    if f.is_file():
        d = json.loads(f.read_text())
        if not (d.get("template") and d.get("task")):
            return {}
        task, name = str(d["task"]), str(d["template"])
        from_recipe = recipe.get("template") if recipe.get("task") == task else None
        return {task: _template_trained(f, name, d.get("hash"), d.get("version"), from_recipe)}
    task, tmpl = recipe.get("task"), recipe.get("template")
    if not (task and tmpl):
        return {}
    if Path(str(tmpl)).suffix in (".yaml", ".yml"):  # a file, maybe relative to the repository (resolve_template)
        import llmrec.prompts as prompts_api
        from llmrec.finetune.data import resolve_template

        try:
            return {str(task): str(resolve_template(prompts_api, str(tmpl)).path)}
        except (OSError, ValueError):
            pass  # the Recommender refuses it, naming the file
    return {str(task): str(tmpl)}


def _recipe_settings(cfg: RankingConfig, adapter: str | Path | None) -> dict[str, Any]:
    """RankingConfig changes that make the Recommender render what `adapter`'s run trained on: `history_len` from
    `data.history_max` and `chat` from `data.chat`, where `cfg` holds the default (an explicit value is kept, with a
    warning); a rank run's `data.n_candidates` other than `cfg.n_candidates` (its letter set) is warned about."""
    recipe = adapter_recipe(adapter)
    if not recipe:
        return {}
    default = RankingConfig()
    task = recipe.get("task")
    out: dict[str, Any] = {}
    h = recipe.get("history_max")
    if isinstance(h, int) and not isinstance(h, bool) and h != cfg.history_len:
        # a Yes/No row holds at most the prepared history (10 events by default): a larger history_max trained on it
        longer = h > cfg.history_len
        if cfg.history_len == default.history_len and h >= 1 and not (task == "yesno" and longer):
            out["history_len"] = h
        elif not (task == "yesno" and longer):
            log.warning("%s was trained with data.history_max=%d but is served history_len=%d history items",
                        adapter, h, cfg.history_len)
    chat = recipe.get("chat")
    if isinstance(chat, bool) and chat != cfg.chat:
        if cfg.chat == default.chat:
            out["chat"] = chat
        else:
            log.warning("%s was trained with data.chat=%s but is served chat=%s prompts", adapter, chat, cfg.chat)
    if task == "next_title" and cfg.mode == "generate":
        # the recipe trains the next title after the history alone: generate renders it so (constrained decoding
        # still writes only candidates); free text needs the list to know what it may write
        if cfg.generate_constrained and cfg.generate_list_candidates == default.generate_list_candidates:
            out["generate_list_candidates"] = False
        elif cfg.generate_list_candidates:
            log.warning("%s was trained on next_title prompts without a candidate list but is served generate-mode "
                        "prompts with one (generate_constrained: false needs the list)", adapter)
    n = recipe.get("n_candidates")
    if task == "rank" and isinstance(n, int) and n != cfg.n_candidates:
        log.warning("%s was trained on %d candidates (data.n_candidates) but is served %d: the letters after the "
                    "first %d were never an answer in training", adapter, n, cfg.n_candidates,
                    min(n, cfg.n_candidates))
    if out:
        log.info("adapter %s: serving with %s, as its run trained", adapter, out)
    return out


def with_adapter_templates(cfg: RankingConfig | None, adapter: str | Path | None,
                           model: str | Path | None = None) -> RankingConfig:
    """`cfg` (or the default) with the templates the adapter was trained on (`model`: a model folder merged from one,
    e.g. by `llmrec export --merge`; the adapter's win), and the run's history length and chat form where `cfg` keeps
    the defaults (`_recipe_settings`); explicit `cfg.templates` win."""
    from dataclasses import replace

    cfg = cfg or RankingConfig()
    got = {**adapter_templates(model), **adapter_templates(adapter)}
    if got:
        log.info("adapter %s was trained on prompt template(s) %s", adapter or model, got)
    return replace(cfg, templates={**got, **cfg.templates}, **_recipe_settings(cfg, adapter))


def backend_model_path(backend: Any) -> str | None:
    """The folder a backend's model was loaded from, where it tells: a vLLM backend's `model`, or a transformers
    model's `name_or_path` (what `from_pretrained` was given)."""
    m = getattr(backend, "model", None)
    if isinstance(m, str | Path):
        return str(m)
    p = getattr(m, "name_or_path", None)
    return str(p) if isinstance(p, str | Path) and str(p) else None


def build_recommender(
    dataset: str | Any,
    backend: str | Any = "transformers",
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    retriever: str | Any = "text",
    cfg: RankingConfig | None = None,
    backend_kw: dict[str, Any] | None = None,
) -> Recommender:
    """`dataset`: a prepared dataset name or object; `backend`: "transformers" | "vllm" or a Backend instance."""
    from llmrec.data import load_prepared

    ds = load_prepared(dataset, prepare_if_missing=True) if isinstance(dataset, str) else dataset
    if isinstance(backend, str):
        from llmrec.llm import load_backend

        backend = load_backend(backend, model=model, adapter=adapter, **(backend_kw or {}))
    ret = build_retriever(ds, retriever) if isinstance(retriever, str) else retriever
    # a merged model (no adapter) carries its adapter's llmrec_prompt.json; a backend built elsewhere names its folder
    cfg = with_adapter_templates(cfg, adapter, model=model if model is not None else backend_model_path(backend))
    return Recommender(ds, backend, ret, cfg, adapter=Path(adapter).name if adapter else None)
