"""Synthetic full-duplex conversation corpus (DESIGN §6)."""
