from .configuration_glider import GliderConfig, check_lora_fields, is_positive_number

__all__ = ["GliderConfig", "check_lora_fields", "is_positive_number"]
