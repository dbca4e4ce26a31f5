"""Evaluation on top of the core: data and streaming perplexity.

The demo (:mod:`kvmerge.eval.demo`) and the tables and plot (:mod:`kvmerge.eval.report`, which
needs matplotlib) are imported from their modules.
"""

from kvmerge.eval.data import SOURCES, load_text
from kvmerge.eval.perplexity import PerplexityRun, prepare_perplexity, streaming_perplexity

__all__ = ["SOURCES", "PerplexityRun", "load_text", "prepare_perplexity", "streaming_perplexity"]
