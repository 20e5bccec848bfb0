"""runm.cli layer."""
