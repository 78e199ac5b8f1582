"""Spiking networks built from cbp_kernels layers, with SpikingJelly / original-repository
checkpoint interoperability (``interop``). All take a multi-step input [T, N, C, H, W] and
return [T, N, classes] (``DigitsNet``, the digits demo's net: logits [N, classes])."""
from . import interop
from .digits_net import DigitsNet
from .nets import PLANS, PlanNet, SEWBlock, alexnet, conv7_fc3, seven_b_net, vgg16, wide_seven_b_net
from .sew_resnet import (SEWResNet, sew_resnet18, sew_resnet34, sew_resnet50, sew_resnet101, sew_resnet152,
                         spiking_resnet18, spiking_resnet34, spiking_resnet50, spiking_resnet101, spiking_resnet152)

__all__ = ["SEWResNet", "sew_resnet18", "sew_resnet34", "sew_resnet50", "sew_resnet101", "sew_resnet152",
           "spiking_resnet18", "spiking_resnet34", "spiking_resnet50", "spiking_resnet101", "spiking_resnet152",
           "PlanNet", "PLANS", "SEWBlock", "seven_b_net", "wide_seven_b_net", "alexnet", "conv7_fc3", "vgg16",
           "interop", "DigitsNet"]
