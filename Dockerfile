# otp-gateway: the gateway only; Asterisk runs beside it (asterisk-config/docker/ or
# your own). docker-compose.yml runs both.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A virtualenv, copied whole into the runtime stage: no sources or build files there.
RUN python -m venv /opt/otp-gateway/.venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/otp-gateway/.venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim

ENV PATH=/opt/otp-gateway/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OTP_GATEWAY_CONFIG=/etc/otp-gateway/config.yaml

# A fixed numeric UID: the state volume's owner is known, and USER is numeric so
# orchestrators can check it is not root.
RUN groupadd --gid 10001 otp-gateway \
    && useradd --uid 10001 --gid otp-gateway --no-create-home \
        --home-dir /var/lib/otp-gateway --shell /usr/sbin/nologin otp-gateway \
    && install -d -o otp-gateway -g otp-gateway -m 0700 /var/lib/otp-gateway
COPY --from=build /opt/otp-gateway/.venv /opt/otp-gateway/.venv

# Mount the config at /etc/otp-gateway/config.yaml (http.host 0.0.0.0, port 8080,
# http.operator_host 0.0.0.0, operator_port 8081, database.url under
# /var/lib/otp-gateway); secrets come from the environment through ${NAME} in it
# (AMI_SECRET, OTP_CODE_SECRET). 8081 serves /metrics and the dashboard: publish it
# to the operator's network only.
USER 10001:10001
WORKDIR /var/lib/otp-gateway
VOLUME ["/var/lib/otp-gateway"]
EXPOSE 8080 8081

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# `docker compose exec gateway python -m gateway keys create NAME` uses the same config.
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["run"]
