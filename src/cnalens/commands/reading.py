"""Placeholder: the reading commands are being written."""
