# ext-authz sidecar image. Build: docker build -t ext-authz .
#
# Stage 1 installs the package and its dependencies into a virtualenv.
# Stage 2 copies only that virtualenv onto a fresh slim base, so the image
# carries no build tools, no wheel files and no pip cache.
#
# The image runs as the non-root user 10001 and writes nothing outside /tmp,
# so it works with a read-only root file system (docker run --read-only
# --tmpfs /tmp, or readOnlyRootFilesystem in Kubernetes with an emptyDir on
# /tmp). Mount the configuration at /etc/ext-authz/config.yaml.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ext-authz
WORKDIR /src
# pyproject.toml names README.md as the package description and the license
# file ships in the wheel, so both are part of the build.
COPY pyproject.toml README.md LICENSE ./
COPY ext_authz ./ext_authz
# pip compiles every module to .pyc here, because the running container
# cannot write bytecode next to the sources.
RUN /opt/ext-authz/bin/pip install . \
    && /opt/ext-authz/bin/pip uninstall --yes pip setuptools

FROM python:${PYTHON_VERSION}-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ext-authz" \
      org.opencontainers.image.description="Envoy external-authorization sidecar that validates OAuth 2.0 bearer tokens" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 ext-authz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin ext-authz
COPY --from=build /opt/ext-authz /opt/ext-authz

# PYTHONDONTWRITEBYTECODE: no .pyc writes on a read-only root file system.
# PYTHONUNBUFFERED: log lines reach `docker logs` and kubectl at once.
# TMPDIR and HOME: the only writable place is /tmp.
ENV PATH=/opt/ext-authz/bin:$PATH \
    EXT_AUTHZ_CONFIG=/etc/ext-authz/config.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
# 9001: gRPC Check and grpc.health.v1; 9002: /metrics, /healthz, /readyz.
EXPOSE 9001 9002
ENTRYPOINT ["ext-authz"]
CMD ["serve"]
