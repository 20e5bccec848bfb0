"""runm.agent layer."""
