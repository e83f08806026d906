"""Pure tensor math: no I/O, no module mutation, no printing."""
