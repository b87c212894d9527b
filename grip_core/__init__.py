"""GRIP Studio core: find and trace MoE routers, unlearn, constrain routers with GRIP, measure.

Never imports streamlit: the dashboard in app/ is a thin view over this package.
"""
from .moe import (GripStudioError, ModelLoadError, MoELayer, MoEModel, NotAnMoEModelError, RoutingTrace,
                  UnsupportedRouterError, load_model)

__version__ = "0.1.0"
__all__ = ["GripStudioError", "ModelLoadError", "MoELayer", "MoEModel", "NotAnMoEModelError", "RoutingTrace",
           "UnsupportedRouterError", "load_model", "__version__"]
