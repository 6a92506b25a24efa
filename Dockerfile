# tsproxy as a container sidecar.
#   docker build -t tsproxy .
# On a tailnet (state in a volume so the node keeps its identity across restarts):
#   docker run --rm -v tsproxy-state:/home/tsproxy/state -p 127.0.0.1:1055:1055 \
#     -e TS_AUTHKEY=tskey-auth-... -e TSPROXY_LOGIN_SERVER=https://headscale.example.com \
#     -e TSPROXY_HOSTNAME=sidecar -e TSPROXY_LISTEN=0.0.0.0:1055 \
#     -e TSPROXY_PROXY_USER=me -v $PWD/proxy-pass:/run/secrets/proxy-pass:ro \
#     -e TSPROXY_PROXY_PASSWORD_FILE=/run/secrets/proxy-pass tsproxy
# Plain WireGuard:
#   docker run --rm -v $PWD/wg0.conf:/etc/tsproxy/wg0.conf:ro -p 127.0.0.1:1055:1055 \
#     -e TSPROXY_WG_CONFIG=/etc/tsproxy/wg0.conf -e TSPROXY_LISTEN=0.0.0.0:1055 \
#     -e TSPROXY_PROXY_USER=me -v $PWD/proxy-pass:/run/secrets/proxy-pass:ro \
#     -e TSPROXY_PROXY_PASSWORD_FILE=/run/secrets/proxy-pass tsproxy
# Inside a container the proxy must listen on 0.0.0.0 to be reachable through -p; tsproxy refuses
# that without proxy credentials unless TSPROXY_ALLOW_PUBLIC_WITHOUT_AUTH=true.
# TS_AUTHKEY is read from the environment (only the first start needs it: the node keys are kept
# in the state volume).  The HEALTHCHECK asks the daemon's /healthz on 127.0.0.1:9100 inside the
# container; `docker run ... -e TSPROXY_METRICS=0.0.0.0:9100 -p 127.0.0.1:9100:9100` also
# exposes /metrics and /readyz.
FROM python:3.11-slim

RUN useradd --system --create-home --home-dir /home/tsproxy --uid 10001 tsproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tsproxy ./tsproxy
RUN pip install --no-cache-dir . && rm -rf /src

USER tsproxy
ENV TSPROXY_STATE_DIR=/home/tsproxy/state \
    TSPROXY_METRICS=127.0.0.1:9100
RUN mkdir -m 700 /home/tsproxy/state
VOLUME ["/home/tsproxy/state"]
EXPOSE 1055
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://' + os.environ['TSPROXY_METRICS'].replace('0.0.0.0', '127.0.0.1') + '/healthz', timeout=4)"]
ENTRYPOINT ["tsproxy"]
CMD ["up", "--foreground"]
