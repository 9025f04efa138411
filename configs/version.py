"""The installed swarmtrain version, shared by the coordinator and the worker."""

from importlib.metadata import PackageNotFoundError, version

try:
    SOFTWARE_VERSION = version("swarmtrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    SOFTWARE_VERSION = "0.0.0+source"
