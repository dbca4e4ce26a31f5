"""Absorbers: what happens to an evicted entry. One module per method."""
