"""Repository-level pytest set-up: doctests of optional integrations run only where their extra is installed."""

import importlib.util

# torchkeep.integrations.lightning subclasses Lightning's CheckpointIO, so importing it needs lightning
collect_ignore_glob = [
    f"src/torchkeep/integrations/{module}.py"
    for module, package in (("lightning", "lightning"),)
    if importlib.util.find_spec(package) is None and importlib.util.find_spec("pytorch_lightning") is None
]
