"""LoRA-native, SVD-based merge methods (TSV-Merge, Iso-C, Iso-CTS): registered in methods.py."""

from __future__ import annotations

SVD_METHODS: tuple = ()
