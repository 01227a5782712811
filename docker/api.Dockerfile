# syntax=docker/dockerfile:1
# The API image (uvicorn api.main:app). docker-compose.yml also runs it as the one-shot `migrate` service and as
# the `cpu` queue worker (webhooks, reaper passes), which is why it carries the whole project and a CPU torch.
# Build from the repository root: docker build -f docker/api.Dockerfile -t nwc-api .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NWC_DATA_DIR=/var/lib/nwc

RUN python -m venv /opt/venv && pip install --upgrade pip

# torch first and pinned, from the CPU index: resolving the project against PyPI alone would pull the
# multi-GB CUDA build (scripts/setup.sh does the same outside Docker).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The dependencies from pyproject.toml alone, so this layer is rebuilt only when they change, not on every
# source edit. torch==2.13.0 is among them and already satisfied by the CPU build above.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (no dependencies left to resolve). Editable on purpose: api/db/migrate.py finds the
# Alembic scripts at <repository>/migrations, beside the packages, which a wheel install would leave behind.
COPY . .
RUN pip install --no-deps -e . \
    && python -m compileall -q api codec worker migrations

# Non-root; the data dir holds Hub imports in progress (NWC_DATA_DIR/tmp), nothing that must outlive a container.
RUN useradd --system --uid 10001 --create-home --home-dir /home/nwc --shell /usr/sbin/nologin nwc \
    && mkdir -p /var/lib/nwc \
    && chown nwc:nwc /var/lib/nwc
USER nwc

EXPOSE 8000
# Liveness only (/healthz answers without touching the database); the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# --proxy-headers takes the client address and scheme from X-Forwarded-* only for the proxies listed in
# FORWARDED_ALLOW_IPS (uvicorn's default: 127.0.0.1). Worker processes: WEB_CONCURRENCY (uvicorn's default: 1).
# The app writes its own JSON access lines (nwc.api.access), so uvicorn's are off.
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--no-access-log"]
