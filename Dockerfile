# The prediction service: python:3.11-slim, dependencies pinned by requirements.txt, run as a non-root user.

# Build stage: the package's wheel, with its C extension (the compiled tree evaluator) built by gcc. The compiler
# stays in this stage; the final image only gets the wheel.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m zipfile -l /wheels/*.whl | grep -q '_trees\..*\.so'

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# LightGBM's wheel links OpenMP (libgomp.so.1), which the slim image does not ship.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build
# Dependencies first: this layer is reused until requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /build /wheels

RUN useradd --create-home --uid 10001 app
USER app
# The default feedback store (sqlite:///moviematch.sqlite3) is a file in the working directory: make it writable.
WORKDIR /home/app

# Railway (and most platforms) set PORT; the service reads it itself, so no shell is needed to expand it.
ENV PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('PORT', '8000'), timeout=2)" || exit 1

# Exec form: the server is PID 1 and receives SIGTERM itself, so in-flight requests can finish on a redeploy.
CMD ["moviematch-ml", "serve"]
