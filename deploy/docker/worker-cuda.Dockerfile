# syntax=docker/dockerfile:1
#
# A volunteer's swarmtrain worker on an NVIDIA GPU: PyTorch's CUDA runtime image plus
# swarmtrain and nvidia-ml-py (for the GPU utilization metric). Build from the repository
# root:
#
#   docker build -f deploy/docker/worker-cuda.Dockerfile -t swarmtrain-worker-cuda .
#
# Run it with the GPU and the host's network (the P2P data plane listens on ports other
# workers must reach, and the coordinator's Prometheus scrapes --metrics-port). The run's
# data and tokenizer (for gptj-6b: ./tokenizer.json and ./data/) go in /data:
#
#   docker run -d --name swarmtrain-worker --restart on-failure --init --gpus all \
#       --network host --stop-timeout 30 -v "$PWD/run-data:/data" swarmtrain-worker-cuda \
#       --gpu 0 --peers /ip4/203.0.113.7/tcp/50510/p2p/12D3KooW... --join-token "$TOKEN" \
#       --metrics-port 9600 --public-name alice-4090
#
# Any PyTorch CUDA runtime image with Python 3.11 or newer will do: pick one whose CUDA
# version your driver supports, e.g. --build-arg BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# the base image's torch is the CUDA build: keep it (swarmtrain only asks for torch>=2.3)
RUN python -c "import sys, torch; \
assert sys.version_info >= (3, 11), f'swarmtrain needs Python 3.11+, the base image has {sys.version}'; \
assert torch.version.cuda, 'the base image has a CPU-only torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

COPY pyproject.toml README.md /src/
COPY configs/ /src/configs/
COPY coordinator/ /src/coordinator/
COPY worker/ /src/worker/
COPY protos/ /src/protos/
RUN pip install /src nvidia-ml-py \
    && rm -rf /src \
    && python -c "import torch; assert torch.version.cuda, 'pip replaced the CUDA torch'" \
    && worker --version

RUN useradd --system --user-group --uid 10001 --create-home --shell /usr/sbin/nologin swarmtrain \
    && mkdir -p /data && chown swarmtrain:swarmtrain /data
USER swarmtrain
# relative paths in the run config (data.paths, data.tokenizer) resolve here
WORKDIR /data

# this worker's /metrics when started with --metrics-port 9600
EXPOSE 9600
# SIGTERM: the worker leaves the swarm (frees its stage) and exits 0
STOPSIGNAL SIGTERM

ENTRYPOINT ["worker"]
