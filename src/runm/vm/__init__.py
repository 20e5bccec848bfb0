"""runm.vm layer."""
