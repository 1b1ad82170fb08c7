# INFINITO on a CUDA machine: `infinito serve` (the default command) or a Prefect worker.
#
#   docker build -t infinito:5.2.0 .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" \
#     -e INFINITO_API_KEY=change-me infinito:5.2.0
#
# docs/serve.md has both commands (server and worker) and what the image holds. PyTorch's wheel
# from PyPI brings its own CUDA runtime libraries; the base image supplies the NVIDIA container
# settings and the host needs an NVIDIA driver recent enough for that wheel.
FROM nvidia/cuda:12.8.1-base-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's security updates replace package versions, so apt packages are left unpinned; the
# Python packages are pinned by requirements.lock.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 infinito

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
RUN python3.11 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/infinito
# The pinned versions first and torch alone: the largest layer, rebuilt only with the lock file.
COPY requirements.lock ./
RUN pip install -c requirements.lock torch
COPY pyproject.toml README.md ./
COPY infinito ./infinito
COPY pipelines ./pipelines
RUN pip install -c requirements.lock .

USER 1000:1000
WORKDIR /home/infinito
EXPOSE 8000
# Inside a container the server must bind all interfaces to be reachable through -p; publish
# the port on the host's loopback (-p 127.0.0.1:8000:8000) or set INFINITO_API_KEY.
CMD ["infinito", "serve", "--model", "/models/best", "--host", "0.0.0.0", "--port", "8000", "--device", "auto"]
