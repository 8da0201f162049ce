"""Inference pipelines over a loaded model bundle."""
