"""Imported first by ``deltatune/__init__``: quiets import-time noise of optional packages.

transformers imports torchao when it is installed (quantized bases: docs/quantized.md), and on a CPU-only machine
that import warns about every GPU kernel it cannot load, while torch warns about torchao's pytree registrations.
Neither concerns anything deltatune does, and they would bury the CLI's one-line messages. Both loggers are set to
errors only, unless the application has set their levels itself.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)
