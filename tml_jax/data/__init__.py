"""Synthetic full-duplex conversation corpus (docs/design.md §6)."""
