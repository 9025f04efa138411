# syntax=docker/dockerfile:1
#
# The swarmtrain coordinator: gRPC control plane, hivemind DHT peer, Prometheus /metrics
# and /sd. It never trains, but hivemind imports torch, so it gets torch's CPU build
# (no CUDA libraries). Build from the repository root:
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t swarmtrain-coordinator .
#   docker run -d --init -p 50500:50500 -p 50510:50510 -p 127.0.0.1:9500:9500 \
#       -v swarmtrain-state:/var/lib/swarmtrain swarmtrain-coordinator \
#       --config gptj-6b --host 0.0.0.0 --grpc-port 50500 --dht-port 50510 --metrics-port 9500 \
#       --state-dir /var/lib/swarmtrain --announce-host 203.0.113.7 --join-token "$TOKEN"
#
# deploy/compose.yaml runs it next to Prometheus and Grafana.

FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index, so that swarmtrain's `torch` requirement is already met
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md /src/
COPY configs/ /src/configs/
COPY coordinator/ /src/coordinator/
COPY worker/ /src/worker/
COPY protos/ /src/protos/
RUN pip install /src \
    && rm -rf /src \
    && coordinator --config gptj-6b --check

RUN useradd --system --user-group --uid 10001 --home-dir /var/lib/swarmtrain --create-home \
        --shell /usr/sbin/nologin swarmtrain
USER swarmtrain
WORKDIR /var/lib/swarmtrain
VOLUME ["/var/lib/swarmtrain"]

# gRPC, hivemind DHT, Prometheus /metrics and /sd
EXPOSE 50500 50510 9500
# SIGTERM: NOT_SERVING, drain in-flight calls, save the registry (allow ~30 s)
STOPSIGNAL SIGTERM

ENTRYPOINT ["coordinator"]
CMD ["--config", "gptj-6b", "--host", "0.0.0.0", "--grpc-port", "50500", "--dht-port", "50510", \
     "--metrics-port", "9500", "--state-dir", "/var/lib/swarmtrain"]
