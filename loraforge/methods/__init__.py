"""The methods layer: one file per parametrisation (an `AdapterLayer` subclass, registered by name),
the initialisers in `init/` and the mixtures of experts in `moe/`. Importing this package imports
every file, and each registers itself in `loraforge.core.registry`."""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)
