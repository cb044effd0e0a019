from .configuration_glider import GliderConfig

__all__ = ["GliderConfig"]
