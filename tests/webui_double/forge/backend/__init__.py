"""Stand-in for Forge's backend package."""
