"""Tokenizers (CLIP BPE)."""
