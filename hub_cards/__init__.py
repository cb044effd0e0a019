"""Model card templates for the Hub (Jinja2, rendered by `huggingface_hub.ModelCard.from_template`).

A package of its own so that the templates install with glider-t5 (as package data) and are found the same way
from a source checkout and from an installed wheel.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

GLIDER_T5_CARD = "glider_t5.md"


@contextmanager
def card_template(name: str = GLIDER_T5_CARD) -> Iterator[Path]:
    """A file path to the card template `name` of this package, for as long as the context lasts."""
    with resources.as_file(resources.files(__name__).joinpath(name)) as path:
        if not path.is_file():
            raise FileNotFoundError(f"No model card template {name!r} in {__name__}: is glider-t5 fully installed?")
        yield path
