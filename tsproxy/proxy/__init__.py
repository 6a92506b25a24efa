"""Front ends: port forwards, reverse forwards, SOCKS5/HTTP proxies, and the dialer they share."""
