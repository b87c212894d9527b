"""GRIP Studio core: find and trace MoE routers, unlearn, constrain routers with GRIP, measure.

Never imports streamlit: the dashboard in app/ is a thin view over this package.
"""
import logging

# transformers imports torchao (the quantization attacks' library) whenever it is installed, at every model load;
# on a CPU torchao then logs that its GPU kernels cannot load, and torch warns about its enums. Both are noise
# here (nothing of ours uses those kernels), so they are muted; real errors from either still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .moe import (GripStudioError, ModelLoadError,  # noqa: E402
                  MoELayer, MoEModel, NotAnMoEModelError, RoutingTrace,
                  UnsupportedRouterError, load_model)

__version__ = "0.1.0"
__all__ = ["GripStudioError", "ModelLoadError", "MoELayer", "MoEModel", "NotAnMoEModelError", "RoutingTrace",
           "UnsupportedRouterError", "load_model", "__version__"]
