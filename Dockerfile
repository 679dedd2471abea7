# The slim sidecar image: `pip install .` without the `engine` extra, so no torch, no CUDA.
#   docker build -t registry.example.com/schedscope-sidecar:0.1.0 .
# The reference engine has its own image (Dockerfile.engine). docs/kubernetes.yaml runs both;
# tests/test_packaging.py keeps the manifest's image names, command and ports in line with
# these files.
FROM python:3.11-slim
LABEL org.opencontainers.image.title="schedscope-sidecar"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY cli ./cli
COPY engine ./engine
COPY telemetry ./telemetry
COPY exporters ./exporters
COPY dashboards ./dashboards
# Fails the build if anything pulled torch in: the point of this image is that it has none.
RUN pip install . \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && schedscope sidecar --help >/dev/null \
 && useradd --system --uid 10001 schedscope \
 && rm -rf /src
WORKDIR /home/schedscope
USER 10001

# /metrics (Prometheus); the raw-event socket lives in a shared volume (ipc://).
EXPOSE 9464
ENTRYPOINT ["schedscope", "sidecar"]
CMD ["--endpoint", "ipc:///var/run/schedscope/events.sock", "--prometheus-host", "0.0.0.0", "--prometheus-port", "9464", "--no-summary"]
