# syntax=docker/dockerfile:1
# Soko's production image: the locked dependencies, the source, the migrations, a non-root
# user and a data volume. Build: `docker build -t soko .`   Run: see compose.yaml.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: resolve nothing, install exactly what uv.lock pins ----------------------------
FROM ${PYTHON_IMAGE} AS build

# The same uv the Makefile pins, so the image installs what `make` installs.
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install "uv==${UV_VERSION}"

WORKDIR /app
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --all-extras --no-install-project
# Then Soko itself. The install points at /app/src, and `soko migrate` finds the
# migrations beside it in /app/migrations, so both stay at these paths in the final image.
COPY src ./src
COPY migrations ./migrations
RUN uv sync --locked --no-dev --all-extras

# -- runtime: the virtualenv and the source, nothing else ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SOKO_DATA_DIR=/var/lib/soko \
    SOKO_HOST=0.0.0.0 \
    SOKO_PORT=8000 \
    SOKO_LOG_FORMAT=json

RUN groupadd --system --gid 10001 soko \
    && useradd --system --uid 10001 --gid soko --home-dir /var/lib/soko --no-create-home \
       --shell /usr/sbin/nologin soko \
    && mkdir -p /var/lib/soko \
    && chown soko:soko /var/lib/soko

WORKDIR /app
COPY --from=build /app /app

USER soko
# SQLite's database and the generated development secrets live here when no
# PostgreSQL is configured; keep it on a volume so they survive the container.
VOLUME ["/var/lib/soko"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('SOKO_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

# uvicorn drains in-flight requests on SIGTERM for SOKO_SHUTDOWN_GRACE_SECONDS.
STOPSIGNAL SIGTERM
CMD ["soko", "serve", "--host", "0.0.0.0"]
