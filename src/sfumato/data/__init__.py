"""Datasets: image-caption folders and built-in synthetic data."""
