# syntax=docker/dockerfile:1
#
# An example trainer: patchwire's client with torch (CPU build) and examples/train_segmentation.py, which trains a
# 3-D U-Net on patches a patchwire server draws and augments, then segments held-out subjects through the server's
# assembler. It reaches the server by address; it needs no dataset of its own.
#
#   docker build -f docker/client.Dockerfile -t patchwire-trainer .      # build context = repository root
#   docker run --rm patchwire-trainer --address data.lab.example:50051 --dataset phantom --held-out 1 \
#       --ca-cert /run/secrets/ca.crt --token-file /run/secrets/writer.token --out /out
#
# Arguments are the example's (--help lists them); the server must serve a phantom-like dataset (labels 0-5).

# ---- build: torch for the CPU, then the project's wheel with its torch extra, into a venv ------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY client/ client/
COPY wire/ wire/
COPY cli/ cli/
COPY protos/ protos/
# torch first, pinned, from the CPU-only index: from the default index the same version pulls CUDA libraries
# (gigabytes). The torch extra then finds it installed and keeps it.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && for whl in /wheels/patchwire-*.whl; do /opt/venv/bin/pip install "${whl}[torch]"; done

# ---- runtime: the venv and the example, run as an unprivileged user ----------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp

COPY --from=build /opt/venv /opt/venv
COPY examples/train_segmentation.py /opt/patchwire/train_segmentation.py

# /out: the example's results (metrics.json, model.pt, NIfTI segmentations); mount a volume to keep them.
RUN groupadd --system --gid 10002 trainer \
    && useradd --system --uid 10002 --gid trainer --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin trainer \
    && install -d -o 10002 -g 10002 -m 0750 /out

WORKDIR /out
USER 10002:10002

ENTRYPOINT ["python", "/opt/patchwire/train_segmentation.py"]
CMD ["--help"]
