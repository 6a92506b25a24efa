"""WireGuard: sans-IO device (handshakes, keypairs, timers, AllowedIPs) and its UDP adapter."""
