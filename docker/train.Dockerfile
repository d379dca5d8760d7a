# syntax=docker/dockerfile:1
# The trainer image: torch (CPU wheel) + `.[train]`, entrypoint `mtrank`, built from the repository root:
# docker build -f docker/train.Dockerfile -t mtrank-train .
#   docker run --rm -v mtrank-work:/work mtrank-train demo --no-serve --workdir /work
#   docker run --rm -v mtrank-work:/work mtrank-train export /work/run --out /work/bundles

# Two stages, as in docker/serve.Dockerfile: the build stage is the full image (gcc, Python headers), where the
# package's required C extension, mtrank._fnv (the feature hash), is compiled; the final stage, slim, gets the
# built virtualenv but neither the source tree nor the compiler. Same Python version in both.
FROM python:3.11.13-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index: PyPI's default Linux wheel pulls in the CUDA libraries (gigabytes)
# that a CPU trainer never loads. `.[train]` then finds torch==2.13.0 satisfied (the +cpu local
# version matches the pin) and leaves it alone. The pin is the one pyproject and .ci/run use.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mtrank ./mtrank
COPY model ./model
# No service/: the trainer never imports it (model/ and service/ meet only in mtrank/); serving is the other image's job.
# "./[train]", not ".[train]": the same install, spelled as a local path so hadolint (DL3013) does
# not take it for an unpinned PyPI package (the project's requirements are pyproject.toml's).
RUN pip install --no-cache-dir "./[train]"


FROM python:3.11.13-slim-bookworm

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The example configs, so `mtrank train examples/census-income/...` works with a mounted data directory.
COPY examples /src/examples

# Same uid as the serving image (docker/serve.Dockerfile): what the trainer exports, the service reads.
# /work and /work/bundles exist and belong to that user so that named volumes mounted there start
# out owned by it (Docker copies a fresh volume's ownership from the image).
RUN groupadd --system --gid 10001 mtrank \
    && useradd --system --uid 10001 --gid mtrank --home-dir /work --shell /usr/sbin/nologin mtrank \
    && mkdir -p /work/bundles \
    && chown -R mtrank:mtrank /work
WORKDIR /work
# Numeric, so a runtime that enforces non-root (Kubernetes runAsNonRoot) can check it without /etc/passwd.
USER 10001:10001

ENTRYPOINT ["mtrank"]
CMD ["demo", "--no-serve", "--workdir", "/work"]
