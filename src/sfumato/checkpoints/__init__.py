"""Checkpoint formats: native safetensors, SD single-file, diffusers folders, CLIP state dicts."""
