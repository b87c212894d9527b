"""Errors of the model layer: each names what was wrong, so a user can act on it."""


class GripStudioError(Exception):
    """Base class of every error GRIP Studio raises on bad input."""


class NotAnMoEModelError(GripStudioError, TypeError):
    """The model has no Mixture-of-Experts block that GRIP Studio could find."""

    def __init__(self, model_class: str, detail: str = ""):
        msg = (f"{model_class} is not a Mixture-of-Experts model: no MoE router was found in it. "
               "GRIP Studio needs a model with routed experts (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V3, ...).")
        super().__init__(msg + (f" {detail}" if detail else ""))
        self.model_class = model_class


class UnsupportedRouterError(GripStudioError, RuntimeError):
    """A router was found but its output cannot be read faithfully; never traced silently."""

    def __init__(self, family: str, module_path: str, detail: str):
        super().__init__(f"cannot read the router of family '{family}' at module '{module_path}': {detail}")
        self.family = family
        self.module_path = module_path


class ModelLoadError(GripStudioError, OSError):
    """A model path is missing, incomplete or corrupt."""


class ConfigError(GripStudioError, ValueError):
    """A RunConfig / GRIPConfig / command-line value is invalid or contradicts another one."""


class RunStoreError(GripStudioError, ValueError):
    """A run folder (or one of its files) cannot be read or written; the message names the file."""


class JobsBusyError(GripStudioError, RuntimeError):
    """The dashboard server already runs as many jobs as it allows."""
