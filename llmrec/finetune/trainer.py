"""The fine-tuning run: load the base (4-bit nf4 or bf16/fp32), attach LoRA BEFORE any forward pass, build the
answer-only examples, score the test subset zero-shot, train with transformers' Trainer (gradient accumulation,
checkpoints + resume, task metrics on the validation subset, progress bars, optional TensorBoard), then save the
adapter, the resolved recipe, the data manifest and the metrics. Runs unchanged under `accelerate launch`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llmrec.bench_utils import write_json
from llmrec.config import llmrec_home, to_dict
from llmrec.finetune.config import FinetuneConfig
from llmrec.finetune.data import (
    AnswerOnlyCollator,
    Example,
    answer_only_loss,
    build_examples,
    encode_all,
    listwise_title_loss,
    manifest,
    warn_history_cut,
)

log = logging.getLogger(__name__)


def output_dir_for(cfg: FinetuneConfig) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else llmrec_home() / "finetune" / f"{cfg.task}_{cfg.dataset}"


# recipe keys that only extend, report or time a run: a checkpoint trained under other values resumes all the same
RUN_ONLY_KEYS = frozenset({
    "output_dir", "results_name", "eval_before", "eval_after", "eval_dtype", "data.n_valid", "data.n_test",
    "train.max_steps", "train.epochs", "train.resume", "train.progress", "train.threads", "train.trim_memory",
    "train.malloc_mmap_threshold_mb", "train.tensor_memory", "train.loss_positions", "train.eval_batch_size",
    "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.report_to"})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in d.items():
        if isinstance(val, dict) and val:
            out.update(_flat(val, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = val
    return out


def recipe_changes(cfg: FinetuneConfig, recipe_file: Path, also: Iterable[str] = ()) -> list[str]:
    """The training keys (all but `RUN_ONLY_KEYS`, plus the run-only keys in `also`) whose value in `cfg` differs from
    the recipe saved in `recipe_file` (a run's recipe.yaml), as "key: saved -> now"; [] when that file does not
    exist."""
    if not recipe_file.is_file():
        return []
    saved = _flat(yaml.safe_load(recipe_file.read_text()) or {})
    now = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # in the form recipe.yaml holds it
    skip = RUN_ONLY_KEYS - set(also)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in dict.fromkeys([*now, *saved])
            if k not in skip and saved.get(k) != now.get(k)]


def stale_checkpoints(ckpt_dir: Path, resume: str | None) -> list[Path]:
    """The `checkpoint-N` folders in `ckpt_dir` that the run about to train there does not continue: all of them for a
    run started over (or resumed from a checkpoint elsewhere), those after the resumed step for a run resumed from one
    of its own. Left in place, a later `train.resume: auto` would pick the highest-numbered one, an earlier run's
    (the recipe check cannot tell: recipe.yaml is this run's by then), and the Trainer's `save_total_limit` rotation
    would delete this run's own newer, lower-numbered checkpoints first."""
    import re

    if not ckpt_dir.is_dir():
        return []
    found = {}
    for d in ckpt_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found[d] = int(m.group(1))
    after = -1
    if resume and Path(resume).resolve().parent == ckpt_dir.resolve():
        m = re.fullmatch(r"checkpoint-(\d+)", Path(resume).name)
        after = int(m.group(1)) if m else max(found.values(), default=0)
    return sorted((d for d, n in found.items() if n > after), key=found.get)


def check_resume_folder(folder: Path) -> None:
    """FileNotFoundError unless `folder` is a Trainer checkpoint (`checkpoint-N` with its trainer_state.json). A run
    folder or its checkpoints/ given instead would pass as a folder, have this run remove the checkpoints in it as an
    earlier run's (`stale_checkpoints`), and then fail to resume from it after the model load."""
    if not folder.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint folder {folder} does not exist")
    if (folder / "trainer_state.json").is_file():
        return
    inside = sorted((d for d in [*folder.glob("checkpoint-*"), *folder.glob("checkpoints/checkpoint-*")]
                     if (d / "trainer_state.json").is_file()), key=lambda d: (len(d.name), d.name))
    hint = (f"; it holds {', '.join(str(d) for d in inside)}: name one of them, or train.resume=auto for the last "
            "one of this run's output_dir") if inside else ""
    raise FileNotFoundError(f"train.resume: {folder} is not a checkpoint folder (no trainer_state.json){hint}")


def _main_process_first() -> Any:
    """accelerate's `main_process_first()` when several processes train (WORLD_SIZE > 1: it sets up the process
    group the Trainer then uses), else nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


# ------------------------------------------------------------------------------------------------ task metrics
def evaluate_examples(backend: Any, task: str, examples: list[Example], max_new_tokens: int = 32,
                      scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """yesno: AUC/accuracy/precision/recall/F1 of P(" Yes"); rank: NDCG/HR/MRR@{1,5,10} of the target's letter
    among the candidates; next_title: exact title match of the greedy continuation. yesno with `scores` given: the
    labels and P(Yes) are also left in it (`labels`, `p_yes`)."""
    from llmrec.metrics import classification_metrics, ranking_metrics, ranks_from_scores

    if not examples:
        return {"n": 0}
    t0 = time.time()
    prompts = [e.prompt for e in examples]
    labels = np.array([e.label for e in examples])
    if task == "yesno":
        lp = backend.score_choices(prompts, [e.choices for e in examples])
        out: dict[str, Any] = classification_metrics(labels, np.exp(lp[:, 0]))
        if scores is not None:
            scores.update(labels=labels, p_yes=np.exp(lp[:, 0]))
    elif task == "rank":
        lp = backend.score_choices(prompts, [e.choices for e in examples])
        ranks = ranks_from_scores(lp, labels)
        out = ranking_metrics(ranks, ks=(1, 5, 10))
        out["n_candidates"] = int(lp.shape[1])
    else:
        gen = backend.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])

        def norm(s: str) -> str:
            return " ".join(s.lower().split()).strip(" .\"'")

        out = {"title_exact": float(np.mean([norm(g) == norm(e.answer) for g, e in zip(gen, examples)]))}
    out["n"] = len(examples)
    out["seconds"] = round(time.time() - t0, 2)
    out["examples_per_s"] = round(len(examples) / max(out["seconds"], 1e-9), 3)
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


def use_bf16_autocast(cfg: FinetuneConfig) -> bool:
    """`train.bf16_autocast` as a bool: "auto" is on when the model computes in bf16 (the 4-bit compute dtype, else
    `dtype`), so a CPU without native bf16 (`fast` = fp32) is never put on emulated bf16 matmuls."""
    from llmrec.llm.loading import resolve_dtype

    flag = cfg.train.bf16_autocast
    if flag != "auto":
        return bool(flag)
    return resolve_dtype(cfg.quant.compute_dtype if cfg.quant.load_in_4bit else cfg.dtype) == "bfloat16"


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def model_memory_mb(model: Any) -> dict[str, float]:
    """Bytes held by the model's tensors (parameters + buffers), in MB: `weights_mb` all of them, `lora_mb` the
    trainable ones. 4-bit weights count at their packed size (uint8 storage, two values per byte); their quantization
    state (absmax per 64-value block) is small and not counted."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"weights_mb": round(total / 2**20, 1), "lora_mb": round(lora / 2**20, 1), "weights_bytes": total,
            "lora_bytes": lora}


def _reset_cuda_peak() -> float | None:
    """The peak allocated CUDA memory so far (MB), then reset the counter; None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def _peak_memory_mb() -> dict[str, float]:
    from llmrec.bench_utils import peak_rss_mb

    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return out


def threshold_metrics(valid: dict[str, Any], test: dict[str, Any]) -> dict[str, float]:
    """Accuracy / precision / recall / F1 on the test scores at the threshold that maximises validation accuracy
    (llmrec.metrics.metrics_at_valid_threshold), from `Evaluator.last_scores` of both splits."""
    from llmrec.metrics import metrics_at_valid_threshold

    return metrics_at_valid_threshold(valid["labels"], valid["p_yes"], test["labels"], test["p_yes"])


class Evaluator:
    """Scores examples with the current LoRA weights. `eval_dtype` "train": the training model itself; otherwise a
    non-quantized copy of the base in that dtype with the same LoRA config, into which the trained LoRA weights are
    copied before each evaluation (what serving runs; 4-bit inference on CPU is several times slower). For a 4-bit
    run the copy holds the 4-bit base's dequantized weights (`load_dequantized_4bit`), the weights the LoRA is fitted
    to, as `llmrec export --merge` and the backends use them for an adapter trained this way."""

    def __init__(self, cfg: FinetuneConfig, train_model: Any, tokenizer: Any):
        self.cfg, self.tok = cfg, tokenizer
        self.model: Any = None  # loaded at the first evaluation
        self.last_scores: dict[str, Any] = {}  # yesno: labels and P(Yes) of the last call

    @property
    def base(self) -> str:
        """What the scores are computed on (recorded as `eval_base` in metrics.json)."""
        if self.cfg.eval_dtype == "train":
            return "the training model"
        kind = "dequantized 4-bit" if self.cfg.quant.load_in_4bit else "full-precision"
        return f"{kind} base, {self.cfg.eval_dtype}"

    def _eval_model(self) -> Any:
        if self.model is None:
            from llmrec.llm.loading import apply_lora, load_causal_lm, load_dequantized_4bit

            if self.cfg.quant.load_in_4bit:
                # quantized from the weights read in `dtype`, as the training base was
                base, _ = load_dequantized_4bit(self.cfg.model, self.cfg.quant, dtype=self.cfg.eval_dtype,
                                                tokenizer=self.tok, source_dtype=self.cfg.dtype)
            else:
                base, _ = load_causal_lm(self.cfg.model, dtype=self.cfg.eval_dtype, tokenizer=self.tok)
            self.model = apply_lora(base, self.cfg.lora)
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        return self.model

    def __call__(self, train_model: Any, examples: list[Example], progress: bool = False) -> dict[str, Any]:
        from llmrec.llm.transformers_backend import TransformersBackend

        m = train_model
        if self.cfg.eval_dtype != "train":
            self._eval_model()
            if train_model is not self.model:  # a rescore scores the evaluation copy itself: nothing to copy
                from peft import get_peft_model_state_dict, set_peft_model_state_dict

                sd = {k: v.detach().to(self.model.device) for k, v in get_peft_model_state_dict(train_model).items()}
                set_peft_model_state_dict(self.model, sd)
            m = self.model
        be = TransformersBackend.from_model(m, self.tok, batch_size=self.cfg.train.eval_batch_size,
                                            progress=progress, name=f"finetune:{self.cfg.task}")
        self.last_scores = {}
        return evaluate_examples(be, self.cfg.task, examples, scores=self.last_scores)


SCORES_DIR = "scores"  # <output_dir>/scores/<pass>.csv: yesno P(Yes) per example (user_id, item_id, label, p_yes)


def save_scores(out_dir: Path | None, name: str, examples: list[Example], scores: dict[str, Any]) -> Path | None:
    """Write one evaluation pass's per-example P(Yes) to `<out_dir>/scores/<name>.csv` (yesno; other tasks leave no
    scores), so a comparison with another method on the same examples (a paired bootstrap, a ROC plot) needs no
    re-scoring. Only the main process writes."""
    if out_dir is None or "p_yes" not in scores or not is_main_process():
        return None
    import pandas as pd

    path = Path(out_dir) / SCORES_DIR / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": [e.user_id for e in examples], "item_id": [e.item_id for e in examples],
                  "label": scores["labels"], "p_yes": scores["p_yes"]}).to_csv(path, index=False)
    return path


def final_evaluation(evaluator: Evaluator, model: Any, examples: dict[str, list[Example]], test: bool = True,
                     progress: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    """`valid_after` and (with `test`) `test_after` of the tuned `model`; yesno: the test split's accuracy/F1 at the
    threshold chosen on the validation split too (`test_after.at_valid_threshold`), and with `out_dir` the per-example
    scores of both passes (`save_scores`)."""
    out: dict[str, Any] = {}
    valid_scores: dict[str, Any] = {}
    if examples["valid"]:
        out["valid_after"] = evaluator(model, examples["valid"])
        valid_scores = evaluator.last_scores
        save_scores(out_dir, "valid_after", examples["valid"], valid_scores)
    if test and examples["test"]:
        out["test_after"] = evaluator(model, examples["test"], progress=progress)
        save_scores(out_dir, "test_after", examples["test"], evaluator.last_scores)
        if valid_scores and evaluator.last_scores:  # yesno: accuracy/F1 at the threshold chosen on valid
            out["test_after"]["at_valid_threshold"] = threshold_metrics(valid_scores, evaluator.last_scores)
        log.info("test after: %s", out["test_after"])
    return out


def init_from_adapter(model: Any, cfg: FinetuneConfig) -> None:
    """Copy `cfg.init_adapter`'s LoRA weights into the fresh LoRA layers of `model`. Refused unless its LoRA settings
    (rank, alpha, target modules) are the recipe's and it was fitted to the base the recipe trains (a QLoRA adapter
    corrects the nf4 weights it was trained on: on other weights it shifts every answer, FINDINGS.md)."""
    from llmrec.config import ConfigError
    from llmrec.llm.loading import adapter_base_dtype, adapter_base_quant, load_adapter_weights, resolve_dtype

    src = Path(cfg.init_adapter)
    saved = json.loads((src / "adapter_config.json").read_text())
    mine = {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "target_modules": sorted(cfg.lora.target_modules)}
    theirs = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
              "target_modules": sorted(saved.get("target_modules") or [])}
    diff = [f"{k}: {theirs[k]} there, {mine[k]} in the recipe" for k in mine if mine[k] != theirs[k]]
    if diff:
        raise ConfigError(f"init_adapter {src}: its LoRA settings differ from the recipe's lora block "
                          f"({'; '.join(diff)})")
    base = adapter_base_quant(src)
    q = cfg.quant
    same = (base is None and not q.load_in_4bit) or (
        base is not None and q.load_in_4bit and (base.quant_type, base.double_quant) == (q.quant_type, q.double_quant))
    if not same:
        there = f"a {base.quant_type} 4-bit base" if base else "a full-precision base"
        here = f"a {q.quant_type} 4-bit base" if q.load_in_4bit else "a full-precision base"
        raise ConfigError(f"init_adapter {src}: it was fitted to {there}, the recipe trains {here}")
    read_in = adapter_base_dtype(src)  # the nf4 codes depend on the dtype the weights were read in
    if q.load_in_4bit and read_in is not None and read_in != resolve_dtype(cfg.dtype):
        raise ConfigError(f"init_adapter {src}: its 4-bit base was quantized from weights read in {read_in}, the "
                          f"recipe's dtype reads them in {resolve_dtype(cfg.dtype)} (other nf4 codes): set dtype")
    load_adapter_weights(model, src)
    log.info("LoRA weights initialised from %s", src)


def rescore_run(cfg: FinetuneConfig, ds: Any = None, home: Path | None = None) -> dict[str, Any]:
    """Score a finished run's adapter (`<output_dir>/adapter`) again with the current evaluation, as `run_finetune`
    does after training (and the zero-shot pass with `eval_before`), on the examples its recipe builds; the training
    figures in `<output_dir>/metrics.json` are kept, the scores replaced, `rescored` says when and at which commit.
    For a run from before adapters recorded their 4-bit base, that record is added (the recipe says it)."""
    from llmrec.bench_utils import git_commit
    from llmrec.config import ConfigError
    from llmrec.data import load_prepared
    from llmrec.llm.loading import BASE_FILE, load_adapter_weights, load_tokenizer, write_adapter_base

    out_dir = output_dir_for(cfg)
    adapter = out_dir / "adapter"
    if not (out_dir / "metrics.json").is_file() or not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{out_dir}: no finished run there (metrics.json and adapter/ expected)")
    if cfg.eval_dtype == "train":
        raise ConfigError("eval_dtype: 'train' scores the training model, which a rescore does not load; use fast, "
                          "bfloat16 or float32")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    ds = ds if ds is not None else load_prepared(cfg.dataset, home=home)
    tok = load_tokenizer(cfg.model)
    examples = build_examples(ds, cfg.task, cfg.data, tok)
    evaluator = Evaluator(cfg, None, tok)
    model = evaluator._eval_model()  # LoRA B = 0: the base itself, for the zero-shot pass
    if cfg.eval_before and examples["test"]:
        metrics["test_before"] = evaluator(model, examples["test"], progress=cfg.train.progress)
        save_scores(out_dir, "test_before", examples["test"], evaluator.last_scores)
    load_adapter_weights(model, adapter)
    metrics.update(final_evaluation(evaluator, model, examples, cfg.eval_after, cfg.train.progress, out_dir))
    if cfg.quant.load_in_4bit and not (adapter / BASE_FILE).exists():
        write_adapter_base(adapter, cfg.quant, cfg.dtype)
    metrics["eval_base"] = evaluator.base
    metrics["rescored"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def run_finetune(cfg: FinetuneConfig, ds: Any = None, home: Path | None = None) -> dict[str, Any]:
    """Train per `cfg`; returns the metrics dict (also written to `<output_dir>/metrics.json`)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from llmrec.bench_utils import peak_rss_mb, trim_heap, vm_rss_mb
    from llmrec.data import load_prepared
    from llmrec.llm.loading import apply_lora, load_causal_lm, load_tokenizer
    t_start = time.time()
    tc = cfg.train
    # before anything is written over the output folder's files (not in load_recipe: a finished run's recipe.yaml
    # stays loadable after its checkpoints are gone)
    if tc.resume not in (None, "auto"):
        check_resume_folder(Path(tc.resume))
    out_dir = output_dir_for(cfg)
    ckpt_dir = out_dir / "checkpoints"
    resume: str | None = None
    if tc.resume == "auto":
        resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    elif tc.resume:
        resume = tc.resume
    # a checkpoint continues the run that wrote it (its folder's recipe.yaml): resuming it under other training
    # settings would silently mix two recipes; a fresh run over another recipe's files replaces them (warned)
    from llmrec.config import ConfigError

    if resume:
        changed = recipe_changes(cfg, Path(resume).resolve().parent.parent / "recipe.yaml")
        if changed:
            raise ConfigError(f"train.resume: checkpoint {resume} was trained with another recipe ("
                              f"{'; '.join(changed)}); use another output_dir, or train.resume=null to start over")
    else:
        changed = recipe_changes(cfg, out_dir / "recipe.yaml")
        if changed:
            log.warning("output_dir %s holds a run of another recipe (%s): its files are replaced by this run's",
                        out_dir, "; ".join(changed))
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        # torchrun / accelerate launch: each process on its own GPU before anything is loaded. A 4-bit load goes to
        # torch.cuda.current_device(), which is 0 in every process until set (accelerate then refuses, in every
        # process but the first, a 4-bit model on another GPU than its own)
        torch.cuda.set_device(int(local_rank))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    mmap_set = False
    if tc.malloc_mmap_threshold_mb:  # before loading: the load's temporaries are the largest blocks of the run
        from llmrec.bench_utils import set_mmap_threshold

        mmap_set = set_mmap_threshold(tc.malloc_mmap_threshold_mb)
        if not mmap_set:
            log.warning("train.malloc_mmap_threshold_mb=%d ignored: no glibc mallopt here",
                        tc.malloc_mmap_threshold_mb)
    set_seed(tc.seed)
    rss_start = peak_rss_mb()

    # the examples first, from the tokenizer alone: a prompt budget the data cannot fit fails in seconds, not after
    # the model load (minutes for a few-billion-parameter model). Under torchrun / accelerate launch the main
    # process goes first: what a first use writes (the prepared dataset, the converted embedded model, a retriever's
    # fitted checkpoint) is written once, and the other ranks read it instead of writing the same files at once
    t0 = time.time()
    with _main_process_first():
        ds = ds if ds is not None else load_prepared(cfg.dataset, home=home)
        tok = load_tokenizer(cfg.model)
        examples = build_examples(ds, cfg.task, cfg.data, tok)
    warn_history_cut(examples, cfg.data)
    build_s = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)  # after the data: a dataset refused leaves no folder behind
    model, tok = load_causal_lm(cfg.model, dtype=cfg.dtype, quant=cfg.quant, tokenizer=tok)
    # LoRA (and prepare_model_for_kbit_training for 4-bit) strictly before the first forward pass
    model = apply_lora(model, cfg.lora, gradient_checkpointing=tc.gradient_checkpointing, quant=cfg.quant)
    if cfg.init_adapter is not None:
        init_from_adapter(model, cfg)
    rss_loaded = peak_rss_mb()
    if tc.trim_memory:
        trim_heap()  # the 4-bit path loads full-precision weights first; give what it freed back
    rss_after_trim = vm_rss_mb()
    model_mem = model_memory_mb(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{n_trainable:,}", f"{n_total:,}",
             100 * n_trainable / n_total)

    import llmrec.prompts as prompts_api
    from llmrec.finetune.data import resolve_template

    template = resolve_template(prompts_api, cfg.data.template or cfg.task)
    man = manifest(ds, cfg.task, cfg.data, examples, template)
    man["dataset"] = cfg.dataset
    man["build_seconds"] = round(build_s, 1)
    if is_main_process():
        stale = stale_checkpoints(ckpt_dir, resume)
        if stale:
            import shutil

            log.warning("removing %d checkpoint(s) of an earlier run from %s (%s): this run %s", len(stale),
                        ckpt_dir, ", ".join(d.name for d in stale),
                        f"continues from {Path(resume).name}" if resume else "starts over (train.resume: null)")
            for d in stale:
                shutil.rmtree(d)
        (out_dir / "data_manifest.json").write_text(json.dumps(man, indent=2) + "\n")
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    listwise = cfg.task == "next_title" and cfg.data.negatives > 0
    train_feats = encode_all(examples["train"], tok, cfg.data.max_len, cfg.data.append_eos, group=listwise)
    valid_feats = encode_all(examples["valid"], tok, cfg.data.max_len, cfg.data.append_eos, split="valid")
    lens = [len(r["input_ids"]) for f in train_feats for r in f.get("group", [f])]
    log.info("train examples: %d (tokens mean %.0f, max %d)", len(train_feats), np.mean(lens), max(lens))

    evaluator = Evaluator(cfg, model, tok)
    metrics: dict[str, Any] = {"task": cfg.task, "dataset": cfg.dataset, "model": str(cfg.model or "default"),
                               "load_in_4bit": cfg.quant.load_in_4bit, "dtype": cfg.dtype,
                               "trainable_params": n_trainable, "total_params": n_total,
                               "train_tokens_mean": float(np.mean(lens)), "train_tokens_max": int(max(lens)),
                               "eval_base": evaluator.base}
    if cfg.eval_before and examples["test"]:
        log.info("zero-shot evaluation on %d test examples", len(examples["test"]))
        metrics["test_before"] = evaluator(model, examples["test"], progress=tc.progress)
        save_scores(out_dir, "test_before", examples["test"], evaluator.last_scores)
        log.info("test before: %s", metrics["test_before"])
        if is_main_process():  # partial metrics, overwritten at the end (status "done")
            write_json(out_dir / "metrics.json", {**metrics, "status": "running"})
    # the evaluation above runs in inference mode; training mode again
    model.train()

    def task_eval(m: Any) -> dict[str, Any]:
        return evaluator(m, examples["valid"])

    class TaskTrainer(Trainer):
        # answer_only_loss divides the token sum by num_items_in_batch (counted over the whole accumulated batch)
        loss_is_scaled_for_ga = True

        def __init__(self, *a: Any, **kw: Any):
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = True  # makes Trainer count num_items_in_batch and pass it here
            self._listwise_parts: list[dict[str, float]] = []

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            # DDP averages gradients, and num_items_in_batch was summed over the processes: scale back
            scale = (self.accelerator.num_processes
                     if self.args.average_tokens_across_devices and num_items_in_batch is not None else 1)
            if "group_size" in inputs:  # listwise next_title groups
                # the micro-batches this optimizer step accumulates: fewer than grad_accum in an epoch's last window
                # (the LM term is normalised by that window's tokens; the listwise mean by its micro-batches)
                n_micro = (getattr(self, "current_gradient_accumulation_steps", None)
                           or self.args.gradient_accumulation_steps)
                loss, parts = listwise_title_loss(
                    model, inputs, tc.listwise_temperature, tc.listwise_lm_weight, num_items_in_batch,
                    positions_as=tc.loss_positions, lm_scale=scale, list_scale=1.0 / n_micro)
                # logged per optimizer step: a micro-batch's LM part is its share of the window's token-normalised
                # loss (and of the processes' when tokens are counted over all of them)
                parts["listwise_lm"] *= n_micro * scale
                self._listwise_parts.append(parts)
                return (loss, {}) if return_outputs else loss
            loss, logits = answer_only_loss(model, inputs, num_items_in_batch, positions_as=tc.loss_positions)
            loss = loss * scale
            return (loss, {"logits": logits}) if return_outputs else loss

        def log(self, logs: dict[str, float], *a: Any, **kw: Any) -> None:
            if self._listwise_parts and "loss" in logs:  # the listwise terms' means since the last log line
                for k in self._listwise_parts[0]:
                    logs[k] = round(float(np.mean([p[k] for p in self._listwise_parts])), 4)
                self._listwise_parts.clear()
            super().log(logs, *a, **kw)

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                     metric_key_prefix: str = "eval") -> dict[str, float]:
            res = task_eval(self.model)
            m = {f"{metric_key_prefix}_{k}": v for k, v in res.items() if isinstance(v, int | float)}
            self.log(m)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, m)
            return m

    class TrimHeapCallback(TrainerCallback):
        """`trim_heap()` after every optimizer step: on CPU the step's freed temporaries (activations, dequantized
        4-bit weights) are otherwise kept resident by glibc, and RSS climbs step after step."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            trim_heap()

    class AdapterBaseCallback(TrainerCallback):
        """Each checkpoint of a 4-bit run records its base as the final adapter does (`llmrec_base.json`), so a
        `checkpoint-N` folder served or merged as an adapter lands on the dequantized 4-bit base it was fitted to."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            from llmrec.llm.loading import write_adapter_base

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_adapter_base(folder, cfg.quant, cfg.dtype)

    callbacks = [TrimHeapCallback()] if tc.trim_memory else []
    if cfg.quant.load_in_4bit:
        callbacks.append(AdapterBaseCallback())
    # transformers' TensorBoard callback reads its folder from the environment when the Trainer is made: this run's
    # folder, set for this run only (a value left behind would send the next run's logs in this process here)
    tb_env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if tc.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "runs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, math.ceil(len(train_feats) / (tc.batch_size * tc.grad_accum * world)))
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(steps_per_epoch * tc.epochs)
    # no validation examples (data.n_valid=0): nothing to evaluate during training, whatever eval_steps says
    eval_during = tc.eval_steps > 0 and bool(valid_feats)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.eval_batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.lr,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps,
        warmup_steps=int(tc.warmup_ratio * total_steps),  # floor: a 1-step warmup would waste step 1 at lr 0
        weight_decay=tc.weight_decay,
        lr_scheduler_type=tc.lr_scheduler,
        logging_steps=tc.logging_steps,
        eval_strategy="steps" if eval_during else "no",
        eval_steps=tc.eval_steps if eval_during else None,
        save_strategy="steps" if tc.save_steps > 0 else "no",
        save_steps=tc.save_steps if tc.save_steps > 0 else 500,
        save_total_limit=tc.save_total_limit,
        report_to=[] if tc.report_to == "none" else [tc.report_to],
        seed=tc.seed,
        bf16=use_bf16_autocast(cfg),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not tc.progress,
        gradient_checkpointing=False,  # handled in apply_lora (before get_peft_model)
        label_names=["labels"],
        # no GPU: tell Trainer so, or `torchrun --nproc_per_node N` on CPU silently trains N independent copies
        # (transformers only builds a gloo process group for DDP when use_cpu is set)
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in the forward pass
    )
    # without bf16/fp16 set, transformers takes the mixed precision from ACCELERATE_MIXED_PRECISION, which
    # `accelerate launch` exports from its config (finetune/accelerate/multi_gpu.yaml: bf16): the recipe decides
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    want = "bf16" if args.bf16 else "no"
    if launcher not in (None, want):
        log.warning("the launcher's mixed precision %r is ignored: the recipe's train.bf16_autocast resolves to %s",
                    launcher, "bf16" if args.bf16 else "off")
    args.mixed_precision = want
    try:
        trainer = TaskTrainer(model=model, args=args, train_dataset=train_feats, eval_dataset=valid_feats or None,
                              data_collator=AnswerOnlyCollator(tok.pad_token_id),
                              callbacks=callbacks or None)
    finally:
        if tb_env is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = tb_env
    if resume:  # found (auto) or checked (a folder) at the start
        log.info("resuming from %s", resume)
    from llmrec.bench_utils import reset_peak_rss, rss_file_mb, vm_hwm_mb

    if tc.trim_memory:
        trim_heap()
    rss_train_start = vm_hwm_mb()  # the peak so far (loading, zero-shot evaluation)
    if rss_train_start is not None:
        rss_train_start = max(rss_train_start, peak_rss_mb())
    hwm_reset = reset_peak_rss()
    rss_at_train = vm_hwm_mb() if hwm_reset else None  # right after the reset: the current RSS
    rss_file_at_train = rss_file_mb()  # of which mapped files (libraries; a checkpoint's pages if still mapped)
    cuda_before = _reset_cuda_peak()  # GPU: the peak so far (loading), then the peak of training alone
    t_train = time.time()
    tensors = None
    if tc.tensor_memory:
        from llmrec.memtrack import TensorMemory, tensor_storages

        tensors = TensorMemory(tensor_storages(model))  # the optimizer's state is made inside train(): counted
    with tensors or contextlib.nullcontext():
        result = trainer.train(resume_from_checkpoint=resume)
    train_wall = time.time() - t_train
    mem = _peak_memory_mb()
    if cuda_before is not None and "peak_cuda_mb" in mem:
        mem["peak_cuda_train_mb"] = mem["peak_cuda_mb"]
        mem["peak_cuda_mb"] = max(mem["peak_cuda_mb"], cuda_before)
    peak_train = vm_hwm_mb() if hwm_reset else None
    if peak_train is not None and rss_at_train is not None:
        # the phase's peak is at least its starting RSS; the kernel's per-thread RSS counters are synced lazily, so a
        # raw VmHWM read can come out ~0.1 MB below the reading taken right after the reset (seen in CI)
        peak_train = max(peak_train, rss_at_train)
    if rss_train_start is not None:  # the reset also cleared ru_maxrss: the whole run's peak is the larger one
        mem["peak_rss_mb"] = round(max(mem["peak_rss_mb"], rss_train_start), 1)
    metrics["train"] = {
        "steps": int(trainer.state.global_step),
        "resumed_from": resume,
        "examples": len(train_feats),
        "wall_s": round(train_wall, 1),
        "examples_per_s": round(float(result.metrics.get("train_samples_per_second", 0.0)), 3),
        "train_loss": float(result.metrics.get("train_loss", float("nan"))),
        "losses": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        # listwise next_title: the listwise term and the share of groups whose true title scored highest, per log line
        **({"listwise": [(h["step"], h["listwise_loss"], h["listwise_top1"]) for h in trainer.state.log_history
                         if "listwise_loss" in h]} if listwise else {}),
        "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum,
        "peak_rss_mb": mem["peak_rss_mb"],
        "rss_before_load_mb": round(rss_start, 1),
        "rss_after_load_mb": round(rss_loaded, 1),
        **({"rss_after_load_trimmed_mb": round(rss_after_trim, 1)} if rss_after_trim is not None else {}),
        "trim_memory": tc.trim_memory,
        "malloc_mmap_threshold_mb": tc.malloc_mmap_threshold_mb if mmap_set else 0,
        # peak RSS during trainer.train() alone (Linux VmHWM reset before it), and the RSS when it started
        **({"peak_rss_train_mb": round(peak_train, 1), "rss_at_train_start_mb": round(rss_at_train, 1),
            "peak_rss_before_train_mb": round(rss_train_start, 1)} if peak_train and rss_at_train
           and rss_train_start else {}),
        **({"rss_file_at_train_start_mb": round(rss_file_at_train, 1)} if rss_file_at_train is not None else {}),
        "gradient_checkpointing": tc.gradient_checkpointing,
        **model_mem,
        # live tensors during trainer.train(): at its start (the model, 4-bit state included) and at the peak
        **({"tensor_base_mb": round(tensors.base_mb, 1), "peak_tensor_mb": round(tensors.peak_mb, 1),
            "tensor_base_bytes": tensors.base_bytes, "peak_tensor_bytes": tensors.peak_bytes}
           if tensors is not None else {}),
        # GPU: peak allocated CUDA memory of the whole run and of trainer.train() alone
        **{k: mem[k] for k in ("peak_cuda_mb", "peak_cuda_train_mb") if k in mem},
    }
    metrics.update(final_evaluation(evaluator, model, examples, cfg.eval_after, tc.progress, out_dir))
    if is_main_process():
        adapter_dir = out_dir / "adapter"
        trainer.model.save_pretrained(str(adapter_dir))
        tok.save_pretrained(str(adapter_dir))
        # which prompt the adapter was trained on: the Recommender, bench and service render with the same one
        # (llmrec.ranking.factory.adapter_templates); `llmrec export --merge` copies it into the merged folder
        from llmrec.llm.loading import PROMPT_FILE, write_adapter_base

        (adapter_dir / PROMPT_FILE).write_text(json.dumps(
            {"task": cfg.task, "template": template.name, "version": template.version, "hash": template.hash},
            indent=2) + "\n")
        if cfg.quant.load_in_4bit:  # merged / served on the dequantized 4-bit base it was fitted to
            write_adapter_base(adapter_dir, cfg.quant, cfg.dtype)
        metrics["adapter"] = str(adapter_dir)
    metrics["wall_s"] = round(time.time() - t_start, 1)
    metrics["output_dir"] = str(out_dir)
    metrics["status"] = "done"
    if is_main_process():
        write_json(out_dir / "metrics.json", metrics)
        if cfg.results_name:
            log.info("wrote %s", write_run_result(cfg, metrics))
    return metrics


TRAIN_COLUMNS = ["steps", "examples", "examples_per_s", "wall_s", "train_loss", "peak_rss_mb", "peak_rss_train_mb",
                 "peak_tensor_mb", "peak_cuda_train_mb", "weights_mb", "lora_mb"]


def write_run_result(cfg: FinetuneConfig, metrics: dict[str, Any], results_dir: Path | None = None) -> Path:
    """`results_name`: the run's figures as `eval/results/<name>.{json,md}` (with the machine, command and commit,
    as every benchmark writes them): a row per evaluated split (zero-shot test, tuned test, tuned validation), the
    training figures, the run's whole wall time; the JSON also holds the resolved recipe."""
    from llmrec.bench_utils import md_table, write_result

    splits = [("test, zero-shot", "test_before"), ("test, tuned", "test_after"), ("valid, tuned", "valid_after")]
    rows = [{"split": label, **{k: v for k, v in metrics[key].items() if isinstance(v, int | float)}}
            for label, key in splits if metrics.get(key)]
    cols = ["split", *dict.fromkeys(k for r in rows for k in r if k != "split")]
    train = metrics.get("train", {})
    tcols = [c for c in TRAIN_COLUMNS if train.get(c) is not None]
    table = (f"Task `{cfg.task}` on {cfg.dataset}, model {metrics.get('model')} "
             f"({'4-bit nf4 + LoRA' if cfg.quant.load_in_4bit else f'{cfg.dtype} + LoRA'}), scored on "
             f"{metrics.get('eval_base')}; whole run {metrics.get('wall_s')} s.\n\n"
             + (md_table(rows, cols) + "\n" if rows else "") + md_table([train], tcols) + "\n")
    payload = {"dataset": cfg.dataset, "metrics": metrics, "recipe": to_dict(cfg)}
    return write_result(cfg.results_name, payload, table, results_dir=results_dir)
