"""TLS client trust shared by the control and DERP clients (the code is in tlsconfig.aio)."""
