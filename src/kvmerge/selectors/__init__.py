"""Selectors: which entries to evict. One module per method."""
