"""The peers the benchmarks and the tests compare against: SpikingJelly 2.0's model zoo.
(Test and benchmark scaffolding, not library code; tests import it as ``bench.peers``.)"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch


def spikingjelly_model_zoo():
    """SpikingJelly 2.0's ``activation_based.model`` package with ``sew_resnet`` and
    ``spiking_resnet`` imported, to build its models for comparison. Those modules import
    ``load_state_dict_from_url`` from torchvision (for pretrained downloads only); when
    torchvision is not installed, stub modules providing ``torch.hub.load_state_dict_from_url``
    stand in during the import and are removed afterwards."""
    names = ("torchvision", "torchvision.models", "torchvision.models.utils")
    added = []
    if importlib.util.find_spec("torchvision") is None:
        for name in names:
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        sys.modules["torchvision.models.utils"].load_state_dict_from_url = torch.hub.load_state_dict_from_url
    try:
        zoo = importlib.import_module("spikingjelly.activation_based.model")
        importlib.import_module("spikingjelly.activation_based.model.sew_resnet")
        importlib.import_module("spikingjelly.activation_based.model.spiking_resnet")
    finally:
        for name in added:
            del sys.modules[name]
    return zoo
