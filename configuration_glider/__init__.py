from .configuration_glider import GliderConfig, is_positive_number

__all__ = ["GliderConfig", "is_positive_number"]
