"""Placeholder: the lora commands are being written."""
