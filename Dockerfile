# ext-authz sidecar image. Build: docker build -t ext-authz .
# Stage 1 builds the wheel; stage 2 installs it on a slim base and runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ext_authz ./ext_authz
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="ext-authz" \
      org.opencontainers.image.description="Envoy external-authorization sidecar that validates OAuth 2.0 bearer tokens" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ext-authz

ENV EXT_AUTHZ_CONFIG=/etc/ext-authz/config.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001
# 9001: gRPC Check and grpc.health.v1; 9002: /metrics, /healthz, /readyz.
EXPOSE 9001 9002
ENTRYPOINT ["ext-authz"]
CMD ["serve"]
