"""Choose the torch device a worker trains on, with errors a volunteer can act on."""

from __future__ import annotations

import torch


class DeviceError(Exception):
    """The requested device cannot be used; the message says what to do instead."""


def resolve_device(gpu: int | None, cpu: bool) -> torch.device:
    if cpu or gpu is None:
        return torch.device("cpu")
    if gpu < 0:
        raise DeviceError(f"--gpu {gpu}: a GPU index is 0 or more (see nvidia-smi), or use --cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--gpu {gpu}: no CUDA GPU is visible to PyTorch (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use --cpu, or install a CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if gpu >= count:
        raise DeviceError(f"--gpu {gpu}: this machine has {count} GPU(s), numbered 0..{count - 1}")
    return torch.device("cuda", gpu)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{device.index} {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"
