# syntax=docker/dockerfile:1
# The serving image: `pip install .[serve]` only (onnxruntime + FastAPI, no torch), built from the
# repository root: docker build -f docker/serve.Dockerfile -t mtrank-serve .
# Two stages so the final image carries the installed virtualenv but neither the source tree nor pip's
# build dependencies (setuptools and its isolated build environment, the C compiler).

# The build stage is the full image (gcc, Python headers): the package's C extension, service._rankjson (the
# /rank JSON paths), is compiled there; the final stage, slim, gets the built virtualenv. Same Python version in both.
FROM python:3.11.13-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# model/ stays out: `mtrank serve` and `mtrank bundle verify` never import it, and without it the
# wheel cannot carry trainer code by accident. README.md is pyproject's `readme`.
COPY pyproject.toml README.md ./
COPY mtrank ./mtrank
COPY service ./service
# "./[serve]", not ".[serve]": the same install, spelled as a local path so hadolint (DL3013) does
# not take it for an unpinned PyPI package (the project's requirements are pyproject.toml's).
RUN pip install --no-cache-dir "./[serve]"


FROM python:3.11.13-slim-bookworm

# A fixed uid, the same as the trainer image's, so bundles the trainer writes into the shared volume
# are owned by the user that reads them here.
RUN groupadd --system --gid 10001 mtrank \
    && useradd --system --uid 10001 --gid mtrank --home-dir /home/mtrank --create-home --shell /usr/sbin/nologin mtrank

COPY --from=build /opt/venv /opt/venv

# Worker and thread counts are settings (service/settings.py), so the environment sets them and compose
# or `docker run -e` overrides them. auto: one worker per core the container gets (its CPU quota counts),
# each with the cores per worker as ONNX Runtime threads; several one-thread workers beat one process with
# several threads (the GIL serialises parsing and response building). One executor thread per worker suits
# one-thread workers (docs/service.md, "Multiprocess").
# MTRANK_HOST: the settings default (127.0.0.1) would be unreachable from outside the container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MTRANK_HOST=0.0.0.0 \
    MTRANK_PORT=8000 \
    MTRANK_WORKERS=auto \
    MTRANK_ONNX__INTRA_OP_THREADS=auto \
    MTRANK_ONNX__EXECUTOR_THREADS=1

# Bundles are data, not image content: the trainer (or any `mtrank export`) writes versions and the
# CURRENT pointer here and the service hot-reloads them, so the directory is a volume.
VOLUME ["/bundles"]
WORKDIR /home/mtrank
# Numeric, so a runtime that enforces non-root (Kubernetes runAsNonRoot) can check it without /etc/passwd.
USER 10001:10001
EXPOSE 8000

# Liveness, not readiness: a replica waiting for its first bundle is alive and loads it as soon as
# CURRENT appears; /readyz is there for a balancer that routes by it. No curl in slim images: python asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('MTRANK_PORT', '8000') + '/healthz', timeout=2)"]

CMD ["mtrank", "serve", "--bundles", "/bundles"]
