"""Model loading, block discovery and the shared block-by-block calibration loop."""
