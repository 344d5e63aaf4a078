# otp-gateway: the gateway only; Asterisk runs beside it (see asterisk-config/).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --create-home --home-dir /srv/otp-gateway otp
WORKDIR /srv/otp-gateway

COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .

USER otp
# Mount the config at /etc/otp-gateway/config.yaml and the state at /srv/otp-gateway/var;
# secrets come from the environment (AMI_SECRET, OTP_CODE_SECRET).
ENV OTP_GATEWAY_CONFIG=/etc/otp-gateway/config.yaml
VOLUME ["/srv/otp-gateway/var"]
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["python", "-m", "gateway"]
CMD ["run"]
