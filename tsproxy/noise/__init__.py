"""Noise building blocks: BLAKE2s hash/HMAC/HKDF, X25519, ChaCha20-Poly1305.

`primitives` is shared by the WireGuard handshake (`ikpsk2`) and the TS2021 control
handshake (`ik`).
"""
