"""pytest-benchmark setup shared by every suite: the device goes into the results' machine info."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import device_name  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cbp_device"] = device_name("cuda" if torch.cuda.is_available() else "cpu")
    machine_info["torch"] = torch.__version__
    machine_info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")  # `make bench` sets malloc's
