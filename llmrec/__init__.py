"""llmrec: recommendations ranked by a (LoRA-tuned) language model."""

__version__ = "0.1.0"
