"""Placeholder: the prune commands are being written."""
