"""Model builders: ZFNet and AlexNet, with paper-style layer names."""

from zfkeras.models.alexnet import AlexNet
from zfkeras.models.zfnet import ZFNet

ARCHITECTURES = ("zfnet", "alexnet", "alexnet2")


def build(architecture, **kwargs):
    """Builds a model by name: 'zfnet', 'alexnet' (one tower) or 'alexnet2'.

    Raises:
        ValueError: for an unknown architecture name.
    """
    if architecture == "zfnet":
        return ZFNet(**kwargs)
    if architecture == "alexnet":
        return AlexNet(towers=1, **kwargs)
    if architecture == "alexnet2":
        return AlexNet(towers=2, **kwargs)
    raise ValueError(f"Unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}.")


__all__ = ["ARCHITECTURES", "AlexNet", "ZFNet", "build"]
