"""runm.proto layer."""
