"""mfbench: simulate and measure fine-tuning of LLMs on mobile phones."""

__version__ = "0.1.0"
