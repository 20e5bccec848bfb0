"""runm.shim layer."""
