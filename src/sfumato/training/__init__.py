"""Training loop and objectives."""
