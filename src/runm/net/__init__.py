"""runm.net layer."""
