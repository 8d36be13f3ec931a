"""medllava test suite (offline, CPU)."""
