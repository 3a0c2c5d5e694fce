"""head-explain: automated interpretability for attention heads."""

__version__ = "0.1.0"
