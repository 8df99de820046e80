"""Every delta method, one file each. Importing this package imports every module in it, and each
method file registers itself with ``@register`` (see registry.py): adding a method is adding a file."""

import importlib
import pkgutil

from .registry import METHODS, config_classes, method_for, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

from .lora import LoRA  # noqa: E402

__all__ = ["LoRA", "METHODS", "config_classes", "method_for", "register"]
