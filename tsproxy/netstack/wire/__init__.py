"""Pure codecs for IPv4, IPv6, TCP, UDP and ICMP headers, and the Internet checksum."""
