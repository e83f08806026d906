"""Calibration and evaluation data: text sources -> seeded token windows."""
