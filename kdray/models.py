"""The paper's models: Teacher = ResNet50V2 ⊕ VGG19 (with BatchNorm) pooled features → dropout → linear; Student = MobileNetV2.

Tiny variants (``tiny_teacher``, ``tiny_student``) run the very same classes with narrow
backbones, for fast tests. Backbone weights load from a torchvision weights name, a local
file or a URI (always with ``weights_only=True``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import typing

import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from kdray import KdrayError, first_line, storage
from kdray.schemas import ModelCost, ModelName

log = logging.getLogger(__name__)

MODEL_NAMES = typing.get_args(ModelName)
TINY_VGG_CFG = [8, "M", 16, "M", 32, "M", 32, "M", 32, "M"]


def resnet50v2_backbone(tiny: bool = False) -> nn.Module:
    """Pre-activation ResNet-50 (He et al. 2016, "ResNetV2"), as timm's ``resnetv2_50``, without its head."""
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    layers, channels = ([1, 1, 1, 1], (16, 32, 64, 128)) if tiny else ([3, 4, 6, 3], (256, 512, 1024, 2048))
    return ResNetV2(layers=layers, channels=channels, num_classes=0, stem_chs=16 if tiny else 64,
                    conv_layer=create_conv2d, norm_layer=BatchNormAct2d)


def vgg19_backbone(tiny: bool = False) -> nn.Module:
    """The convolutional part of VGG19 with BatchNorm (torchvision's ``vgg19_bn`` layout, so its weights load).

    Plain VGG19 does not train from random initialisation here: after 5 epochs of the full
    accuracy recipe its pooled features added ~1e-10 to the teacher's logits, so the teacher was
    ResNet50V2 alone while paying 83% of its FLOPs for VGG19. BatchNorm makes the branch learn.
    """
    cfg = TINY_VGG_CFG if tiny else torchvision.models.vgg.cfgs["E"]
    return torchvision.models.vgg.make_layers(cfg, batch_norm=True)


class Teacher(nn.Module):
    """ResNet50V2 and VGG19 global-average-pooled features (2048 + 512), concatenated → dropout → linear."""

    def __init__(self, num_classes: int, dropout: float = 0.3, tiny: bool = False):
        super().__init__()
        self.resnet = resnet50v2_backbone(tiny)
        self.vgg = vgg19_backbone(tiny)
        self.pool = nn.AdaptiveAvgPool2d(1)
        vgg_out = [c for c in (TINY_VGG_CFG if tiny else torchvision.models.vgg.cfgs["E"]) if c != "M"][-1]
        self.feature_dim = self.resnet.num_features + vgg_out
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.resnet.forward_features(x)  # pre-activation ResNet: its final norm+act is inside
        b = self.vgg(x)
        features = torch.cat([self.pool(a).flatten(1), self.pool(b).flatten(1)], 1)
        return self.head(self.dropout(features))


class Student(nn.Module):
    """MobileNetV2 features → global average pool → dropout → a new linear head."""

    def __init__(self, num_classes: int, dropout: float = 0.2, tiny: bool = False):
        super().__init__()
        width = 0.25 if tiny else 1.0
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width)
        if tiny:
            net.features = net.features[:8]
        self.features = net.features
        self.feature_dim = _out_channels(self.features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def build_model(name: str, num_classes: int, dropout: float = 0.3, weights: str | None = None) -> nn.Module:
    if name not in MODEL_NAMES:
        raise KdrayError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise KdrayError(f"a classifier needs at least 2 classes, got {num_classes}")
    tiny = name.startswith("tiny_")
    model = Teacher(num_classes, dropout, tiny) if name.endswith("teacher") else Student(num_classes, dropout, tiny)
    if weights:
        load_backbone_weights(model, weights)
    return model


def student_from_teacher_name(student: str = "mobilenetv2", teacher: str = "resnet50v2-vgg19") -> str:
    """torchdistill-style run name, e.g. ``mobilenetv2_from_resnet50v2-vgg19``."""
    return f"{student}_from_{teacher}"


# ----------------------------------------------------------------------------- weights


def _torchvision_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Published ImageNet weights by torchvision/timm name, mapped onto our module names."""
    try:
        if isinstance(model, Student):
            w = torchvision.models.MobileNet_V2_Weights[name if name != "imagenet" else "DEFAULT"]
            sd = w.get_state_dict(progress=False)
            return {k: v for k, v in sd.items() if k.startswith("features.")}
        vgg = torchvision.models.VGG19_BN_Weights[name if name != "imagenet" else "DEFAULT"].get_state_dict(progress=False)
        import timm

        resnet = timm.create_model("resnetv2_50", pretrained=True, num_classes=0).state_dict()
    except KeyError:
        raise KdrayError(f"unknown weights name {name!r}: use DEFAULT/IMAGENET1K_V1/imagenet, or a file path/URI") from None
    except (OSError, RuntimeError) as exc:
        raise KdrayError(f"cannot download ImageNet weights {name!r} ({first_line(exc, 120)}); "
                         "put the file in the torch hub cache or pass a local path/URI") from None
    out = {f"resnet.{k}": v for k, v in resnet.items()}
    out.update({k.replace("features.", "vgg.", 1): v for k, v in vgg.items() if k.startswith("features.")})
    return out


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    """Load a state dict (or a checkpoint with a ``model`` entry) from a local path or URI, safely."""
    loc = storage.resolve(uri)
    if not storage.exists(loc):
        raise KdrayError(f"weights file not found: {uri}")
    with tempfile.TemporaryDirectory() as tmp:
        path = loc.path if not loc.is_s3 else os.path.join(tmp, "weights.pt")
        if loc.is_s3:
            with open(path, "wb") as fh:
                fh.write(storage.read_bytes(loc))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise KdrayError(f"{uri}: not a loadable weights file ({first_line(exc, 160)})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise KdrayError(f"{uri}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_backbone_weights(model: nn.Module, weights: str) -> None:
    """Load backbone weights by name or from a file; the classifier head stays freshly initialised."""
    is_file = "/" in weights or weights.endswith((".pt", ".pth")) or weights.startswith("s3://")
    sd = load_state_dict_file(weights) if is_file else _torchvision_state_dict(model, weights)
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and not k.startswith("head.") and own[k].shape == v.shape}
    backbone_keys = [k for k in own if not k.startswith("head.")]
    if not usable:
        raise KdrayError(f"weights {weights!r} share no parameter names/shapes with {type(model).__name__}")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d backbone tensors from %s", len(usable), len(backbone_keys), weights)


# ----------------------------------------------------------------------------- cost


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter; a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, image_size: int) -> ModelCost:
    return ModelCost(params=count_params(model), backbone_params=backbone_params(model),
                     gflops=count_flops(model, image_size) / 1e9, image_size=image_size)
