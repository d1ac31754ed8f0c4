"""Outputs that are really smaller: the compressed sparse checkpoint."""
