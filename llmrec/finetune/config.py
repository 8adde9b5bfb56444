"""Typed fine-tuning recipe (`finetune/recipes/*.yaml`), loaded with unknown-key errors and `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmrec.config import ConfigError, load_config
from llmrec.llm.loading import LoraSettings, QuantSettings

TASKS = ("yesno", "rank", "next_title")
# transformers SchedulerType values of every version (others are checked against the installed one)
_COMMON_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class DataSettings:
    """Which examples are built, and how many. `n_train: 0` (or null) uses every training example."""

    n_train: int | None = 256  # few-shot size (TALLRec: 16, 64, 256, ...); sampled with `seed`
    seed: int = 0
    # draws the n_valid / n_test subsets (and their rank candidates), apart from `seed`: runs with other training rows
    # (seed) are scored on the same validation and test rows
    eval_seed: int = 0
    template: str | None = None  # prompt template name; default = the task name
    max_len: int = 448  # token budget of prompt + answer (the prompt's history is trimmed to fit)
    history_max: int = 10
    n_candidates: int = 20  # rank: candidates per prompt (target + n-1 others), letters A, B, ...; next_title: the
    # list `negatives` are drawn from
    candidates: Literal["popular", "random", "retrieval"] = "popular"
    # candidates: retrieval -> the retriever that lists them for every split, training positions included (the
    # user's events before the target only): one of llmrec.ranking.factory.RETRIEVERS (text, hybrid, hybrid:sasrec,
    # bert_lstm, ...)
    retriever: str = "hybrid"
    n_valid: int | None = 200  # validation examples scored during training (fixed seeded subset); null = all, 0 = none
    n_test: int | None = 1000  # test examples scored before/after training (fixed seeded subset); null = all, 0 = none
    append_eos: bool = True  # the answer is followed by the EOS token (also counted in the loss)
    # next_title: > 0 adds a listwise term to the loss: each example's title is scored against this many other titles
    # drawn (seeded) from the `n_candidates` that `candidates` / `retriever` list for the events before the target
    # (candidates: retrieval = the hard negatives the Recommender's likelihood mode will rank it among)
    negatives: int = 0
    # training examples' other candidates (rank) and negatives (next_title) never include an item the user rates later
    # in the training split: it is a true next item of a later position (ML-100K rank recipe: 14.9% of the popularity-
    # sampled distractors, 37.4% of BERT+LSTM's top 19; false: as the runs recorded before 2026-12-07)
    exclude_later: bool = True
    # yesno: drop the sampled training rows whose (user, item) is a leave-one-out valid/test target of the next-item
    # task. The Yes/No split is by time, so its own test rows are never trained on, but 642 of ML-100K's 79,248 train
    # rows hold a next-item test target (652 a valid one; the recipe's 768 rows: 14): set it when the adapter will also
    # rank next items (eval/pointwise_rank.py). The manifest counts such rows either way (`loo_targets`).
    exclude_eval_targets: bool = False
    chat: bool = False


@dataclass
class TrainSettings:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    logging_steps: int = 5
    eval_steps: int = 0  # 0: evaluate on the validation subset only at the end of training
    save_steps: int = 50
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    # bf16 mixed precision (torch.autocast, also on CPU). "auto": on where the model computes in bf16 (`dtype` /
    # `quant.compute_dtype` resolve to bfloat16): the base is bf16 already, and autocast runs the fp32 LoRA matmuls in
    # bf16 instead of casting each LoRA layer's input to fp32 and its output back (CPU, 135M yesno step: 1.1x faster)
    bf16_autocast: bool | Literal["auto"] = False
    report_to: Literal["none", "tensorboard"] = "none"
    resume: str | None = None  # "auto" (last checkpoint in output_dir if any), a checkpoint folder, or null
    threads: int = 0  # torch threads on CPU; 0 = torch default
    # CPU: hand freed heap memory back to the OS (glibc malloc_trim) after loading and after every optimizer step.
    # The 4-bit load and the per-step weight dequantization free large blocks that glibc otherwise keeps resident.
    trim_memory: bool = True
    # CPU, glibc: allocations of this many MiB or more are mapped and unmapped on their own (mallopt
    # M_MMAP_THRESHOLD, = MALLOC_MMAP_THRESHOLD_), so a step's freed activations leave RSS at once instead of staying
    # on a fragmented heap; lowers peak RSS, costs page faults. 0 = glibc's default (dynamic, up to 32 MiB)
    malloc_mmap_threshold_mb: int = 0
    # count the bytes of live tensors during training (llmrec.memtrack: the CPU's counterpart of
    # torch.cuda.max_memory_allocated, without the runtime and allocator overhead that RSS holds); ~15% slower
    tensor_memory: bool = False
    # how the loss's answer window reaches transformers' `logits_to_keep`: "index" (a tensor of positions) or "int"
    # (its length, which makes transformers slice the hidden states: the same logits, 1.13x slower recipe runs on CPU;
    # kept to measure that, `finetune/bench.py speed --configs int_window recipe`)
    loss_positions: Literal["index", "int"] = "index"
    eval_batch_size: int = 8
    # next_title with data.negatives > 0: loss = listwise_lm_weight x the answer-only LM loss of the true title +
    # the cross-entropy of softmax(s / listwise_temperature) over the example's titles, s = a title's mean log-prob
    # per token after the prompt (the score of the likelihood ranking mode)
    listwise_temperature: float = 0.25
    listwise_lm_weight: float = 1.0
    seed: int = 0
    progress: bool = True


@dataclass
class FinetuneConfig:
    task: Literal["yesno", "rank", "next_title"] = "yesno"
    dataset: str = "ml-100k"
    model: str | None = None  # local HF folder; null = the embedded SmolLM2-135M-Instruct
    dtype: str = "fast"  # base weights when not 4-bit ("fast": bf16 where the hardware has it, else fp32)
    quant: QuantSettings = field(default_factory=QuantSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval_dtype: str = "fast"  # evaluation model: non-quantized base in this dtype + a copy of the LoRA weights
    # (the serving setup; 4-bit inference on CPU is ~5x slower); "train" scores with the training model itself
    eval_before: bool = True  # score the test subset with the untuned model (zero-shot) first
    eval_after: bool = True
    output_dir: Path | None = None  # default: $LLMREC_HOME/finetune/<task>_<dataset>
    results_name: str | None = None  # also write eval/results/<name>.{json,md}
    # start from this adapter's LoRA weights (same lora settings and base quantization) instead of a fresh LoRA, e.g.
    # a next_title adapter continued with the listwise loss
    init_adapter: Path | None = None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, path, overrides)
    # what the messages below name: a value may come from the file or from a key=value override
    path = "recipe (defaults + overrides)" if path is None else f"{path} + overrides" if overrides else path
    if cfg.task not in TASKS:
        raise ConfigError(f"{path}: task {cfg.task!r} is not one of {list(TASKS)}")
    if cfg.data.n_candidates < 2 or cfg.data.n_candidates > 26:
        raise ConfigError(f"{path}: data.n_candidates must be in 2..26 (letters A-Z), got {cfg.data.n_candidates}")
    from llmrec.ranking.factory import RETRIEVERS

    if cfg.data.retriever not in RETRIEVERS:
        raise ConfigError(f"{path}: data.retriever {cfg.data.retriever!r} is not one of {list(RETRIEVERS)}")
    _check_template(cfg, path)
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError(f"{path}: train.batch_size and train.grad_accum must be >= 1")
    if cfg.data.negatives < 0:
        raise ConfigError(f"{path}: data.negatives must be >= 0, got {cfg.data.negatives}")
    if cfg.data.negatives and cfg.task != "next_title":
        raise ConfigError(f"{path}: data.negatives is for task next_title (got task {cfg.task!r})")
    if cfg.data.negatives >= cfg.data.n_candidates:
        raise ConfigError(f"{path}: data.negatives ({cfg.data.negatives}) must be below data.n_candidates "
                          f"({cfg.data.n_candidates}), the list they are drawn from with the target")
    if cfg.train.listwise_temperature <= 0:
        raise ConfigError(f"{path}: train.listwise_temperature must be > 0, got {cfg.train.listwise_temperature}")
    if cfg.train.listwise_lm_weight < 0:
        raise ConfigError(f"{path}: train.listwise_lm_weight must be >= 0, got {cfg.train.listwise_lm_weight}")
    if cfg.init_adapter is not None and not (Path(cfg.init_adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{path}: init_adapter {cfg.init_adapter} is not an adapter folder (no adapter_config.json)")
    # values otherwise met only after the run has written recipe.yaml / data_manifest.json / metrics.json over the
    # output folder's (the evaluation model, TrainingArguments; train.resume: checked by run_finetune first thing)
    from llmrec.llm.loading import _DTYPES

    for key, val, ok in (("dtype", cfg.dtype, _DTYPES), ("quant.compute_dtype", cfg.quant.compute_dtype, _DTYPES),
                         ("eval_dtype", cfg.eval_dtype, ("train", *_DTYPES))):
        if val not in ok:
            raise ConfigError(f"{path}: {key} {val!r} is not one of {list(ok)}")
    if cfg.train.lr_scheduler not in _COMMON_SCHEDULERS:  # transformers' full list costs a torch import: only here
        from transformers.trainer_utils import SchedulerType

        known = [s.value for s in SchedulerType]
        if cfg.train.lr_scheduler not in known:
            raise ConfigError(f"{path}: train.lr_scheduler {cfg.train.lr_scheduler!r} is not one of {known}")
    if not 0 <= cfg.train.warmup_ratio <= 1:
        raise ConfigError(f"{path}: train.warmup_ratio must be in [0, 1], got {cfg.train.warmup_ratio}")
    if cfg.train.max_steps <= 0 and not cfg.train.epochs > 0:
        raise ConfigError(f"{path}: train.epochs must be > 0 (or train.max_steps > 0), got {cfg.train.epochs}")
    if cfg.quant.quant_type not in ("nf4", "fp4"):  # else only met when the model loads
        raise ConfigError(f"{path}: quant.quant_type {cfg.quant.quant_type!r} is not one of ['nf4', 'fp4']")
    if cfg.train.logging_steps < 1:
        raise ConfigError(f"{path}: train.logging_steps must be >= 1, got {cfg.train.logging_steps}")
    # counts and sizes read deep in the run (a pandas sample, TrainingArguments), or, negative, silently ignored there
    for key, val, low in (("data.n_train", cfg.data.n_train, 0), ("data.n_valid", cfg.data.n_valid, 0),
                          ("data.n_test", cfg.data.n_test, 0), ("data.max_len", cfg.data.max_len, 1),
                          ("data.history_max", cfg.data.history_max, 0), ("train.eval_steps", cfg.train.eval_steps, 0),
                          ("train.save_steps", cfg.train.save_steps, 0),
                          ("train.eval_batch_size", cfg.train.eval_batch_size, 1), ("lora.r", cfg.lora.r, 1)):
        if val is not None and val < low:
            raise ConfigError(f"{path}: {key} must be >= {low}, got {val}")
    if cfg.train.malloc_mmap_threshold_mb < 0:
        raise ConfigError(f"{path}: train.malloc_mmap_threshold_mb must be >= 0 (0 = glibc's default), got "
                          f"{cfg.train.malloc_mmap_threshold_mb}")
    return cfg


def _check_template(cfg: FinetuneConfig, path: object) -> None:
    """data.template (default: the task's own) exists, is a template of the recipe's task, and a rank one has a
    label for each of data.n_candidates: met otherwise as a render error while the examples are built."""
    import llmrec.prompts as P
    from llmrec.finetune.data import resolve_template

    name = cfg.data.template or cfg.task
    try:
        t = resolve_template(P, name)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: data.template: {e}") from None
    if t.task != cfg.task:
        same = [n for n in P.list_templates() if P.load_template(n).task == cfg.task]
        raise ConfigError(f"{path}: data.template {name!r} is a {t.task} template ({t.path}); task {cfg.task} needs "
                          f"one of {same} or a YAML file of task {cfg.task}")
    labels = t.verbalizer.labels if t.verbalizer and t.verbalizer.labels else ""
    if cfg.task == "rank" and cfg.data.n_candidates > len(labels):
        raise ConfigError(f"{path}: data.n_candidates={cfg.data.n_candidates} but template {t.name!r} labels at most "
                          f"{len(labels)} candidates ({labels!r})")
