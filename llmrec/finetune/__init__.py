"""LoRA / QLoRA fine-tuning of the ranking LLM: recipes (`FinetuneConfig`), answer-only training data, the run."""

from llmrec.finetune.config import DataSettings, FinetuneConfig, TrainSettings, load_recipe

__all__ = ["DataSettings", "FinetuneConfig", "TrainSettings", "load_recipe", "run_finetune"]


def run_finetune(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - lazy: keeps torch out of `import llmrec.finetune`
    from llmrec.finetune.trainer import run_finetune as _run

    return _run(*args, **kwargs)
