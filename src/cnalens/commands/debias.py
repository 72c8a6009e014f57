"""Placeholder: the debias commands are being written."""
