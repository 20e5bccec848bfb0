"""runm.channel: byte streams between host and guest, and the stdio multiplexer."""
