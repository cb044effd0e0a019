"""`router_candidates` and the `routing_candidates` argument out of range: refused where they enter, naming the field
or argument, the old value kept and files unchanged."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, make_base, make_expert

BAD_VALUES = [0, 1, 4, -1, True, 2.5, "3"]  # top-k is 2 and there are 3 experts


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-candidates")
    base = make_base(seed=3)
    dirs = [
        make_expert(root, base, f"task{i}", r=3, seed=10 + i, embedding=torch.eye(3, EMBED_DIM)[i]) for i in range(3)
    ]
    folder = root / "saved"
    GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, router_candidates=3).save_pretrained(folder)
    return folder


def experts(n: int = 3) -> list[dict]:
    return [{"name": f"e{i}", "target_modules": ["q"], "r": 2} for i in range(n)]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_values_are_refused_at_construction(value):
    with pytest.raises((ValueError, StrictDataclassError), match="router_candidates"):
        GliderConfig(experts=experts(), router_top_k=2, router_candidates=value)


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_values_set_after_loading_are_refused_and_the_old_value_kept(saved, value):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved)
    with pytest.raises((ValueError, StrictDataclassError), match="router_candidates"):
        model.config.router_candidates = value
    assert model.config.router_candidates == 3


def test_top_k_cannot_rise_above_the_candidates(saved):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved)
    model.config.router_candidates = 2
    with pytest.raises(ValueError, match=r"router_candidates must be None or an integer >= router_top_k \(3\)"):
        model.config.router_top_k = 3
    assert model.config.router_top_k == 2


@pytest.mark.parametrize("order", ["candidates first", "reference first"])
def test_reference_compatibility_refuses_candidates(saved, order):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved, router_candidates=None)
    first, second = ("router_candidates", 2), ("routing_compatibility", "reference")
    if order == "reference first":
        first, second = second, first
    setattr(model.config, *first)
    with pytest.raises(ValueError, match="router_candidates cannot be combined with routing_compatibility='reference'"):
        setattr(model.config, *second)
    assert getattr(model.config, second[0]) == (None if second[0] == "router_candidates" else "glider")


@pytest.mark.parametrize("value, message", [(4, r"router_candidates = 4 exceeds the number of experts \(3\)"),
                                            (1, r"router_candidates must be None or an integer >= router_top_k")])  # fmt: skip
def test_saved_config_with_bad_candidates_is_refused_files_unchanged(saved, tmp_path, value, message):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in saved.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "router_candidates": value}))
    before = digest(folder)
    with pytest.raises(ValueError, match=message):
        GliderT5ForConditionalGeneration.from_pretrained(folder)
    assert digest(folder) == before


def test_removing_an_expert_below_the_candidates_is_refused(saved):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"fewer than router_candidates = 3; lower model.config.router_candidates"):
        model.remove_expert("task1")
    assert model.config.expert_names == ["task0", "task1", "task2"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "candidates, knob, error, message",
    [
        (torch.tensor([[0, 1, 2], [2, 1, 0]]), None, ValueError, r"routing_candidates were given, but they need"),
        (torch.tensor([[0, 1], [2, 1]]), 3, ValueError, r"routing_candidates must be a long tensor \[rows, "),
        (torch.tensor([[0, 1, 2]]), 3, ValueError, r"routing_candidates must be a long tensor"),
        (torch.tensor([[0.0, 1, 2], [2, 1, 0]]), 3, ValueError, r"got torch.float32 \(2, 3\)"),
        (torch.tensor([[0, 1, 3], [2, 1, 0]]), 3, RuntimeError, r"routing_candidates hold expert ids outside"),
        (torch.tensor([[0, 1, -2], [2, 1, 0]]), 3, RuntimeError, r"routing_candidates hold expert ids outside"),
    ],
)
@torch.no_grad()
def test_bad_routing_candidates_are_refused(saved, candidates, knob, error, message):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved, router_candidates=knob).eval()
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    with pytest.raises(error, match=message):
        model(input_ids=ids, decoder_input_ids=ids, instruction_embeddings=u, routing_candidates=candidates)
    with pytest.raises(error, match=message):
        model.generate(ids, instruction_embeddings=u, routing_candidates=candidates, max_new_tokens=2)


@torch.no_grad()
def test_candidates_without_global_routing_are_refused(saved):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved).eval()
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"routing_candidates were given.*global routing absent"):
        model(input_ids=ids, decoder_input_ids=ids, routing_candidates=torch.tensor([[0, 1, 2], [0, 1, 2]]))
