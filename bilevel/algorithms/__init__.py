"""The methods, one module each, composed from the core.

Importing this package imports every module in it, and each registers its learners
with `bilevel.runs.register`, so ``bilevel train NAME`` finds them.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
