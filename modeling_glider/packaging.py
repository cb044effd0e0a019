"""What a flat model folder holds besides the weights: the code files that let it load with `trust_remote_code=True`
where this package is not installed. A leaf module (it imports nothing of this package), so that the modeling code
and the Hub code can both use it without importing each other."""

import inspect
from pathlib import Path

try:  # a flat folder (save_pretrained, the Hub) holds both files side by side
    from .configuration_glider import GliderConfig
except ImportError:  # the installed packages
    from configuration_glider import GliderConfig

# The keywords of `save_pretrained(..., push_to_hub=True)` that go to the Hub push rather than to the save.
HUB_KWARGS = ("repo_id", "token", "private", "revision", "create_pr", "commit_message", "commit_description")


def code_files() -> list[Path]:
    """The files a flat folder needs to run this model without the package: `auto_map` and `custom_pipelines` in
    the config point into them, and each relative import among them must be a file beside them."""
    here = Path(__file__).parent
    names = (
        "modeling_glider.py",
        "packaging.py",
        "routing.py",
        "fast_lora.py",
        "offload.py",
        "experts.py",
        "pipeline_glider.py",
        "embedding.py",
        "instructions.py",
        "staging.py",
    )
    return [Path(inspect.getfile(GliderConfig))] + [here / name for name in names]
