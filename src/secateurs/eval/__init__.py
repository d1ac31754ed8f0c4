"""Perplexity, sparsity and environment reports."""

from .perplexity import perplexity, window_nll
from .report import library_versions, machine, parameter_counts, peak_rss_bytes

__all__ = ["perplexity", "window_nll", "library_versions", "machine", "parameter_counts", "peak_rss_bytes"]
