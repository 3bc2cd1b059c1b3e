"""slmshift: measure and perform the move of agentic systems from large to small language models."""

__version__ = "0.1.0"
