"""Opening TCP streams to control and DERP servers, directly or through an HTTP CONNECT proxy
named by the environment (HTTPS_PROXY / HTTP_PROXY / NO_PROXY), as Go clients do."""
