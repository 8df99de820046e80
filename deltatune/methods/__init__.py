"""Every delta method, one file (or package) each. Importing this package imports every module in it, and each
method registers itself with ``@register`` (core/registry.py): adding a method is adding a file."""

import importlib
import pkgutil

from ..core.registry import METHODS, config_classes, mergeable_methods, method_for, register

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "config_classes", "mergeable_methods", "method_for", "register"]
