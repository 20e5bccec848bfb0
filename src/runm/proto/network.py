"""The guest's network, as QEMU's user-mode (slirp) network sets it up and the agent
configures it: known to both sides, so it lives with the protocol."""

GUEST_INTERFACE = "eth0"
GUEST_ADDRESS = "10.0.2.15"
GUEST_CIDR = f"{GUEST_ADDRESS}/24"
GUEST_NETWORK = "10.0.2.0/24"  # GUEST_CIDR's network
GATEWAY = "10.0.2.2"  # the host: slirp maps it to the host's loopback
DNS = "10.0.2.3"  # slirp's DNS forwarder, which uses the host's resolver
