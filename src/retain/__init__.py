"""retain: continual post-training of language models — what a model learned, what it forgot, and why."""

__version__ = "0.1.0"
