"""Find, describe and trace the routers of any transformers MoE."""
from .errors import GripStudioError, ModelLoadError, NotAnMoEModelError, UnsupportedRouterError
from .families import FAMILIES, FamilySpec, family_for
from .layers import MoELayer, find_moe_layers
from .load import DEMO_MODEL_DIR, REPO_ROOT, load_model
from .model import MoEModel
from .trace import RoutingTrace, router_hooks

__all__ = ["GripStudioError", "ModelLoadError", "NotAnMoEModelError", "UnsupportedRouterError", "FAMILIES",
           "FamilySpec", "family_for", "MoELayer", "find_moe_layers", "DEMO_MODEL_DIR", "REPO_ROOT", "load_model",
           "MoEModel", "RoutingTrace", "router_hooks"]
