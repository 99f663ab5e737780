"""Experiment tracking: logger factories, per-epoch dose images, run comparison."""
