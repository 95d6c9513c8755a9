"""sigma: a command-line toolkit for generative-vision research."""

__version__ = "0.1.0"
