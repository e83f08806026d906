"""sotool: compress neural networks with second-order information."""

__version__ = "0.1.0"
