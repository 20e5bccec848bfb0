"""runm.sandbox layer."""
