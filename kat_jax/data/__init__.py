"""Tokenizers, chat templates, record sources, packing and the Grain input pipeline."""
