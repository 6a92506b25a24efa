"""Name resolution over the tunnel: DNS message codec (sans-IO) and resolvers (aio)."""
