"""runm: OCI containers in lightweight VMs, with unmodified runc in the guest."""

__version__ = "0.1.0"
