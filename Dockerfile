# syntax=docker/dockerfile:1
# The modelfit operator image: `modelfit run` (kopf) in a slim, non-root Python runtime.
#
#   docker build -t ghcr.io/modelfit/modelfit-operator:0.1.0 .
#
# Stage 1 builds the wheel and installs it with its dependencies (binary wheels only, so
# no compiler is needed or left behind) into a virtual environment; stage 2 copies only
# that environment onto a fresh base, removes the installers, and runs as UID/GID 65532.
# The base tag is pinned; bump it deliberately.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m venv /opt/modelfit \
 && /opt/modelfit/bin/pip install --no-compile "setuptools>=68" wheel \
 && /opt/modelfit/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist . \
 && /opt/modelfit/bin/pip install --no-compile --only-binary :all: /dist/modelfit-*.whl \
 && /opt/modelfit/bin/pip uninstall --yes setuptools wheel pip \
 && /opt/modelfit/bin/python -m compileall -q -j 0 /opt/modelfit/lib \
 && /opt/modelfit/bin/modelfit --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modelfit-operator" \
      org.opencontainers.image.description="Kubernetes operator that right-sizes llama.cpp's llama-server for GGUF models" \
      org.opencontainers.image.source="https://github.com/modelfit/modelfit" \
      org.opencontainers.image.licenses="Apache-2.0"
# No installers in the runtime image: drop the base image's pip/setuptools/wheel too.
RUN rm -rf /usr/local/lib/python3.11/site-packages/pip* \
           /usr/local/lib/python3.11/site-packages/setuptools* \
           /usr/local/lib/python3.11/site-packages/wheel* \
           /usr/local/bin/pip* /usr/local/bin/idle* /usr/local/bin/pydoc* \
 && groupadd --system --gid 65532 modelfit \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin modelfit
COPY --from=build /opt/modelfit /opt/modelfit
ENV PATH=/opt/modelfit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 65532:65532
WORKDIR /tmp
# 8081: liveness (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8081 9090
ENTRYPOINT ["modelfit", "run"]
CMD ["--standalone", "--all-namespaces"]
