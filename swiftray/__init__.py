"""swiftray: RL-first LLM training on Ray, speaking ms-swift's command line."""

__version__ = "0.1.0"
