"""fika: one short LoRA trial from a validated config (no Ray here; `search/` runs many)."""

__version__ = "0.1.0"
