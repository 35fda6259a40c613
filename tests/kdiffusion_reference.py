"""Load k-diffusion's sampling module (the reference our samplers must equal) without its package
__init__, which imports torchvision. torchvision is stubbed only while k_diffusion.utils imports
(it uses it for image helpers the samplers never call) and removed again afterwards, so nothing
else in the test session believes torchvision is installed."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load_kdiffusion_sampling():
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    stub_names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    stubs_added = [n for n in stub_names if n not in sys.modules]
    for name in stubs_added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    sys.modules["k_diffusion"] = package
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name in stubs_added:
            sys.modules.pop(name, None)
