"""Routed models (VGG-11/16 with batch norm, ResNet-50) with one head per task, and
``extract_subnetwork`` to cut out one task's dense subnetwork."""
from .blocks import RecomputableMaxPool2d, ReferenceBNReLURoute2d, RoutedNet
from .heads import TaskHeads
from .resnet import Bottleneck, RoutedResNet, resnet50
from .subnetwork import extract_subnetwork
from .vgg import CONFIGS, RoutedVGG, vgg11_bn, vgg16_bn

__all__ = ["vgg11_bn", "vgg16_bn", "resnet50", "RoutedVGG", "RoutedResNet", "RoutedNet", "Bottleneck",
           "TaskHeads", "ReferenceBNReLURoute2d", "RecomputableMaxPool2d", "CONFIGS", "extract_subnetwork"]

