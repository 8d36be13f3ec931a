"""Stage runners: SFT (alignment, instruction tuning) and GRPO."""
