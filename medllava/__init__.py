"""medllava: train LLaVA-style medical vision-language assistants on any vision encoder + LLM pair."""

__version__ = "0.1.0"
