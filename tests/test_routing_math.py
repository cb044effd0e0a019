"""GliderT5 against independent references: the bare base T5, PEFT, and a naive per-token loop written here."""

import copy
import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, make_base, make_expert

PREFIX = "base_model.model."


def inputs(seed=0, batch=2, length=6, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g), torch.randint(2, vocab, (batch, 5), generator=g)


@pytest.mark.parametrize("gated", [True, False])
def test_zero_B_experts_leave_base_logits_unchanged(tmp_path, gated):
    base = make_base(gated=gated)
    dirs = [
        make_expert(tmp_path, base, f"e{i}", seed=i, zero_B=True, embedding=torch.randn(EMBED_DIM)) for i in range(3)
    ]
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2)
    ids, dec = inputs()
    u = torch.randn(2, EMBED_DIM)
    with torch.no_grad():
        expected = base(input_ids=ids, decoder_input_ids=dec).logits
        assert torch.equal(glider(input_ids=ids, decoder_input_ids=dec).logits, expected)
        assert torch.equal(glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits, expected)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_one_expert_top1_equals_peft(tmp_path, use_rslora):
    base = make_base(dtype=torch.float64)  # float64 throughout: any difference is a bug, not rounding
    directory = make_expert(tmp_path, base, "only", r=4, lora_alpha=12, use_rslora=use_rslora, seed=3)
    glider = GliderT5ForConditionalGeneration.from_experts(base, [directory], top_k=1)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    ids, dec = inputs()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, decoder_input_ids=dec).logits
        assert not torch.allclose(expected, base(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-3)
        torch.testing.assert_close(
            glider(input_ids=ids, decoder_input_ids=dec).logits, expected, atol=1e-10, rtol=1e-10
        )


class NaiveRoutedLinear(nn.Module):
    """The GLIDER formula, token by token and expert by expert, in float64."""

    def __init__(self, linear: nn.Linear, experts: list[dict], alpha: float, top_k: int, top_p, query):
        super().__init__()
        self.linear, self.experts, self.alpha, self.top_k, self.top_p, self.query = (
            linear,
            experts,
            alpha,
            top_k,
            top_p,
            query,
        )

    @property
    def weight(self):  # T5 reads `wo.weight.dtype`
        return self.linear.weight

    @staticmethod
    def layer_norm(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    def forward(self, x):
        out = self.linear(x).double()
        u = self.query.get("u")
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                xt = x[b, t].double()
                logits = []
                for e in self.experts:
                    logit = self.layer_norm(xt) @ self.layer_norm(e["gate"]) / math.sqrt(xt.numel())
                    if u is not None:
                        logit = logit + self.alpha * (u[b] @ e["G"]) / (u[b].norm() * e["G"].norm())
                    logits.append(logit)
                probs = torch.softmax(torch.stack(logits), dim=0)
                order = sorted(range(len(self.experts)), key=lambda i: -probs[i].item())[: self.top_k]
                if self.top_p is not None:
                    kept, mass = [], 0.0
                    for i in order:
                        if mass < self.top_p:
                            kept.append(i)
                        mass += probs[i].item()
                    order = kept
                total = sum(probs[i] for i in order)
                for i in order:
                    e = self.experts[i]
                    out[b, t] += probs[i] / total * e["scaling"] * (e["B"] @ (e["A"] @ xt))
        return out.to(x.dtype)


def naive_model(base, expert_dirs, alpha, top_k, top_p):
    """A copy of the base whose adapted linears are `NaiveRoutedLinear`s, built from the files alone."""
    model = copy.deepcopy(base)
    query = {}
    per_module = {}
    for directory in expert_dirs:
        adapter = json.loads((directory / "adapter_config.json").read_text())
        weights = load_file(directory / "adapter_model.safetensors")
        extra = load_file(directory / "glider_expert.safetensors")
        for key, A in weights.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[len(PREFIX) : -len(".lora_A.weight")]
            B = weights[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            alpha_e = adapter["lora_alpha"]
            scaling = alpha_e / math.sqrt(r) if adapter.get("use_rslora") else alpha_e / r
            G = extra.get("instruction_embedding")
            per_module.setdefault(path, []).append(
                {
                    "A": A.double(),
                    "B": B.double(),
                    "scaling": scaling,
                    "gate": extra[f"gate.{path}"].double(),
                    "G": None if G is None else G.double(),
                }
            )
    for path, experts in per_module.items():
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, name, NaiveRoutedLinear(getattr(parent, name), experts, alpha, top_k, top_p, query))
    return model, query


@pytest.fixture
def heterogeneous_library(tmp_path):
    """Three experts with different ranks, alphas, rslora, rank patterns and module sets."""
    base = make_base(seed=1, dtype=torch.float64)  # only the fp32 routing differs from the float64 reference
    embeddings = torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(7))
    dirs = [
        make_expert(tmp_path, base, "wide", r=2, lora_alpha=4, seed=10, embedding=embeddings[0]),
        make_expert(
            tmp_path,
            base,
            "attention_and_ff",
            r=4,
            lora_alpha=8,
            use_rslora=True,
            targets=("q", "v", "wi_0", "wo"),
            seed=11,
            embedding=embeddings[1],
        ),
        make_expert(
            tmp_path,
            base,
            "second_block_only",
            r=8,
            lora_alpha=16,
            rank_pattern={"k": 3},
            layers=[1],
            seed=12,
            embedding=embeddings[2],
        ),
    ]
    return base, dirs


@pytest.mark.parametrize(
    "top_k, use_global, top_p",
    [(2, False, None), (2, True, None), (3, True, None), (1, True, None), (3, False, 0.6)],
)
def test_equals_naive_per_token_reference(heterogeneous_library, top_k, use_global, top_p):
    base, dirs = heterogeneous_library
    alpha = 2.0  # comparable to the local logits, so both terms decide
    glider = GliderT5ForConditionalGeneration.from_experts(
        base, dirs, top_k=top_k, global_routing_scale=alpha, router_top_p=top_p
    )
    naive, query = naive_model(base, dirs, alpha, top_k, top_p)
    ids, dec = inputs(seed=5)
    u = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(9)) if use_global else None
    query["u"] = None if u is None else u.double()
    with torch.no_grad():
        expected = naive(input_ids=ids, decoder_input_ids=dec).logits
        got = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
    assert not torch.allclose(expected, base(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)  # fp32 routing in a float64 model


def test_heterogeneous_library_shapes(heterogeneous_library):
    base, dirs = heterogeneous_library
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs)
    k0 = glider.get_submodule("encoder.block.0.layer.0.SelfAttention.k")
    k1 = glider.get_submodule("encoder.block.1.layer.0.SelfAttention.k")
    wi1 = glider.get_submodule("decoder.block.1.layer.2.DenseReluDense.wi_1")
    assert k0.expert_ids == [0] and k1.expert_ids == [0, 2] and wi1.expert_ids == [0, 2]
    assert k1.lora_A.shape == (2, 3, 32)  # ranks 2 and 3 (rank_pattern), padded to 3
    assert glider.config.experts[2]["target_modules"] == sorted(glider.config.experts[2]["target_modules"])


def test_mixed_task_batch_rows_equal_single_rows(heterogeneous_library):
    base, dirs = heterogeneous_library
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=50.0)
    ids, dec = inputs(seed=2, batch=3)
    u = torch.eye(3, EMBED_DIM) + 0.1  # three different "tasks"
    with torch.no_grad():
        batched = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
        rows = [
            glider(
                input_ids=ids[i : i + 1], decoder_input_ids=dec[i : i + 1], instruction_embeddings=u[i : i + 1]
            ).logits
            for i in range(3)
        ]
        same_task = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u[:1].expand(3, -1)).logits
    # fp32 routing sums in a batch-shape dependent order (~1e-6); this random toy T5 amplifies that to ~1e-4
    torch.testing.assert_close(batched, torch.cat(rows), atol=1e-3, rtol=1e-3)
    assert (batched[1:] - same_task[1:]).abs().max() > 0.1  # the rows really were routed differently


def test_gradient_checkpointing_keeps_per_query_routing(heterogeneous_library):
    """The recomputed blocks must see the same routing inputs: gradients agree with and without checkpointing."""
    base, dirs = heterogeneous_library
    ids, dec = inputs(seed=4)
    u = torch.randn(2, EMBED_DIM, dtype=torch.float64)
    grads = []
    for checkpointing in (False, True):
        glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=3.0).train()
        if checkpointing:
            glider.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = glider(input_ids=ids, labels=dec, instruction_embeddings=u).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in glider.named_parameters() if "lora_B" in n]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-8)


def test_routing_knobs_are_read_from_the_model_config(heterogeneous_library):
    base, dirs = heterogeneous_library
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=2.0)
    fresh = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1, global_routing_scale=7.0)
    model.config.router_top_k, model.config.global_routing_scale = 1, 7.0
    ids, dec = inputs(seed=8)
    u = torch.randn(2, EMBED_DIM, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits,
                           fresh(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits)  # fmt: skip
