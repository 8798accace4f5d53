"""Synth²: synthetic image–text pairs in embedding space (METHODS.md §6).

captions   the caption LM's data, balanced concept prompts, sampling, diversity statistics
"""
