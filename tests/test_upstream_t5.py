"""The T5 code GliderT5 re-implements must be what the installed transformers has: an upgrade that changes it must
fail here (then review the change, port it, and update the hash), never change GliderT5's behaviour silently."""

import hashlib
import inspect

import pytest
from transformers.models.t5 import modeling_t5

import modeling_glider.modeling_glider as glider


@pytest.mark.parametrize("name", sorted(glider.REIMPLEMENTED_FROM_T5))
def test_reimplemented_t5_code_matches_the_installed_transformers(name):
    cls, method = name.split(".")
    source = inspect.getsource(getattr(getattr(modeling_t5, cls), method))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == glider.REIMPLEMENTED_FROM_T5[name], (
        f"transformers' {name} changed (sha256 {digest}); GliderT5's re-implementation was written against "
        f"{glider.REIMPLEMENTED_FROM_T5[name]}: port the change to modeling_glider.py, then update the hash."
    )


def test_every_marked_reimplementation_is_listed():
    source = inspect.getsource(glider)
    marked = set()
    for line in source.splitlines():
        if "Re-implemented from transformers:" in line:
            text = line.split("Re-implemented from transformers:")[1]
            marked |= {word.strip(",.") for word in text.split() if word.startswith("T5") and "." in word}
    assert marked == set(glider.REIMPLEMENTED_FROM_T5)
