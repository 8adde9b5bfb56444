"""Prompt templates (versioned YAML data in `prompts/`) and rendering with a token budget."""

from llmrec.prompts.render import (
    HistoryItem,
    Item,
    PromptBudgetError,
    RenderedPrompt,
    history_from_dataset,
    item_text,
    items_from_dataset,
    liked_shown,
    quotable_titles,
    render,
    target_stats_text,
    user_stats_text,
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
    "liked_shown",
    "quotable_titles",
    "quote",
    "read_lock",
    "render",
    "target_stats_text",
    "template_hash",
    "user_stats_text",
    "write_lock",
]
