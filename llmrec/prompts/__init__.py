"""Prompt templates (versioned YAML data in `prompts/`) and rendering with a token budget."""

from llmrec.prompts.render import (
    HistoryItem,
    Item,
    PromptBudgetError,
    RenderedPrompt,
    history_from_dataset,
    item_text,
    items_from_dataset,
    render,
)
from llmrec.prompts.templates import (
    PromptTemplate,
    TemplateOptions,
    Verbalizer,
    list_templates,
    load_template,
    lock_problems,
    prompts_dir,
    read_lock,
    template_hash,
    write_lock,
)
from llmrec.prompts.text import clean, quote
from llmrec.prompts.tokens import WhitespaceTokenizer, count_tokens

__all__ = [
    "HistoryItem",
    "Item",
    "PromptBudgetError",
    "PromptTemplate",
    "RenderedPrompt",
    "TemplateOptions",
    "Verbalizer",
    "WhitespaceTokenizer",
    "clean",
    "count_tokens",
    "history_from_dataset",
    "item_text",
    "items_from_dataset",
    "list_templates",
    "load_template",
    "lock_problems",
    "prompts_dir",
    "quote",
    "read_lock",
    "render",
    "template_hash",
    "write_lock",
]
