"""llamactl: plan, start, supervise and route llama.cpp servers."""

__version__ = "0.1.0"
