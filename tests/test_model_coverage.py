"""Every MoE model type of the installed transformers, built tiny and recorded end to end.

Parametrized over `installed_moe_types()`, so a new transformers release's MoE types are
tested as soon as it is installed. GAPS (kept in sync with docs/models.md) lists the types
that cannot be recorded yet, each with its reason; they run as strict xfails, so a fix
shows up as a failure until its entry is removed here and in the docs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import routescope as rs
from tests.moe_types import installed_moe_types
from tests.test_capture import expected_rows, padded_batch, recorded_rows

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

DOCS = Path(__file__).resolve().parent.parent / "docs" / "models.md"

# model type -> why routescope cannot record it yet (docs/models.md, "Gaps", says the same)
GAPS: dict[str, str] = {}

MODEL_TYPES = installed_moe_types()


def _zaya_may_skip(model: torch.nn.Module) -> None:
    """ZAYA's skip class starts with bias -1, which a tiny random router never overcomes."""
    for module in model.modules():
        if type(module).__name__ == "ZayaRouter":
            module.balancing_biases.zero_()


# model type -> (a step that makes the tiny model use its extra choices, the first extra id);
# the recording must contain such an id, so the path that maps it is covered
EXTRA_CHOICES = {
    "longcat_flash": (lambda model: None, 4),  # zero-compute experts: ids 4 and 5
    "zaya": (_zaya_may_skip, 4),  # the skip class: id 4
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the thread
    pool's waits cost more than the matmuls (10x and more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cases() -> list:
    return [
        pytest.param(t, marks=pytest.mark.xfail(reason=GAPS[t], strict=True)) if t in GAPS else t
        for t in MODEL_TYPES
    ]


_LAYER = re.compile(r"(?:layers|blocks)\.(\d+)\.")
# router classes whose decision the experts module alone does not show -> RouterCapture method
_ROUTER_HOOKS = {
    "Llama4Router": "_llama4",
    "ZayaRouter": "_zaya",
    "JetMoeTopKGating": "_jetmoe",
    "DogeCDMoE": "_doge",
    "LongcatFlashTopkRouter": "_longcat",
}


class RouterCapture:
    """The test's own record of router decisions, one list of (layer, ids, weights) per forward.

    It knows each router kind from the modeling code, not from routescope's adapter table:
    the ids and weights an experts module is called with, or for routers whose experts are
    not such a module, the decision rebuilt another way than the adapter does.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.forwards: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []
        self.handles = [model.register_forward_pre_hook(lambda module, args: self.forwards.append([]))]
        routers: dict[int, tuple[torch.nn.Module, str]] = {}
        experts: dict[int, torch.nn.Module] = {}
        for name, module in model.named_modules():
            found = _LAYER.search(name + ".")
            if found is None:
                continue
            layer, kind = int(found.group(1)), type(module).__name__
            if kind in _ROUTER_HOOKS and (kind != "JetMoeTopKGating" or name.endswith("mlp.router")):
                routers.setdefault(layer, (module, kind))
            elif kind.endswith("Experts") and layer not in experts:
                experts[layer] = module
        for layer, (module, kind) in routers.items():
            getattr(self, _ROUTER_HOOKS[kind])(layer, module)
        for layer, module in experts.items():
            if layer not in routers:
                self.handles.append(module.register_forward_pre_hook(self._experts(layer), with_kwargs=True))

    def _add(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.forwards[-1].append((layer, ids.detach().clone(), weights.detach().clone()))

    def _experts(self, layer: int):
        def hook(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
            if len(values) < 3:
                return  # Llama 4's experts get pre-scaled inputs only; its router is hooked
            ids, weights = values[1], values[2]
            if weights.shape != ids.shape:
                weights = weights.gather(-1, ids)
            self._add(layer, ids, weights)

        return hook

    def _llama4(self, layer: int, module: torch.nn.Module) -> None:
        def hook(module, args, output):
            scores, logits = output
            ids = torch.topk(logits, module.top_k, dim=1).indices
            self._add(layer, ids, scores.gather(1, ids))

        self.handles.append(module.register_forward_hook(hook))

    def _zaya(self, layer: int, module: torch.nn.Module) -> None:
        # the unmasked choice, from the logits; the skip class is id num_experts, weight 0
        def hook(module, args, output):
            logits = output[0]
            probs = torch.softmax(logits, dim=-1)
            ids = torch.topk(probs.float() + module.balancing_biases, module.top_k, dim=-1).indices
            weights = probs.gather(1, ids).masked_fill(ids == module.num_experts, 0)
            self._add(layer, ids, weights)

        self.handles.append(module.register_forward_hook(hook))

    def _jetmoe(self, layer: int, module: torch.nn.Module) -> None:
        # undo the sort by expert with the per-expert counts
        def hook(module, args, output):
            index_sorted, _, gates, expert_size, logits = output
            sorted_ids = torch.repeat_interleave(torch.arange(module.num_experts), torch.tensor(expert_size))
            ids = torch.empty_like(index_sorted)
            ids[index_sorted] = sorted_ids.to(ids.device)
            weights = torch.empty_like(gates)
            weights[index_sorted] = gates
            self._add(layer, ids.view(logits.shape[0], -1), weights.view(logits.shape[0], -1))

        self.handles.append(module.register_forward_hook(hook))

    def _longcat(self, layer: int, module: torch.nn.Module) -> None:
        # from 5.25 the MoE block remaps zero-compute choices before the experts call, so the
        # decision is rebuilt from the logits as the router's own code makes it
        def hook(module, args, output):
            logits = output[0]
            scores = logits.softmax(dim=-1)
            ids = torch.topk(scores + module.e_score_correction_bias, module.top_k, dim=-1, sorted=False)[1]
            self._add(layer, ids, (scores.gather(1, ids) * module.routed_scaling_factor).to(logits.dtype))

        self.handles.append(module.register_forward_hook(hook))

    def _doge(self, layer: int, module: torch.nn.Module) -> None:
        # the ids the expert embeddings are looked up with; each id's score is the sum of its
        # two product keys' logits, softmaxed over the chosen ids
        chosen: list[torch.Tensor] = []
        self.handles.append(
            module.down_embed.register_forward_pre_hook(lambda m, args: chosen.append(args[0]))
        )

        def hook(module, args, output):
            ids = chosen.pop()
            logits = output[1]
            rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
            scores = logits[0][rows, ids // module.num_keys] + logits[1][rows, ids % module.num_keys]
            weights = torch.softmax(scores, dim=-1)
            if module.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            self._add(layer, ids, weights)

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("model_type", _cases())
def test_model_type_records_exactly(model_type, tiny_model, tmp_path, device):
    model = tiny_model(model_type)
    prepare, first_extra = EXTRA_CHOICES.get(model_type, (lambda model: None, None))
    prepare(model)
    ids, mask = padded_batch(device, "left", lengths=(6, 5))
    capture = RouterCapture(model)
    try:
        with rs.record(model, tmp_path / "run"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=3,
                min_new_tokens=3,  # no row finishes early: every fed token is model work
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        capture.remove()
    run = rs.open_run(tmp_path / "run")
    manifest = run.manifest
    batch, width = ids.shape
    new = out.shape[1] - width
    assert len(capture.forwards) == 1 + new  # the last generated token is never fed back

    # invariants: k rows per token per MoE layer, no padding token, each token once, ids in range
    tokens = run.sql("SELECT seq_id, pos FROM tokens")
    assert len(tokens) == 2 * int(mask.sum()) + batch * (new - 1) == manifest["tokens"]
    assert not tokens.duplicated().any()
    counts = run.sql("SELECT seq_id, pos, layer, count(*) AS n FROM routing GROUP BY ALL")
    assert sorted(counts.layer.unique()) == manifest["moe_layers"]
    for layer in manifest["moe_layers"]:
        assert (counts[counts.layer == layer].n == manifest["top_k"][str(layer)]).all()
        assert (counts.layer == layer).sum() == len(tokens)
    ranges = run.sql("SELECT layer, min(expert) AS lo, max(expert) AS hi FROM routing GROUP BY layer")
    for row in ranges.itertuples():
        assert row.lo >= 0 and row.hi < manifest["num_experts"][str(row.layer)]
    if first_extra is not None:
        assert ranges.hi.max() >= first_extra

    # exactness: the recorded rows equal the independently captured decisions
    mask = mask.cpu()
    full_mask = torch.cat([mask, torch.ones(batch, new, dtype=mask.dtype)], dim=1)
    masks = [mask, mask] + [full_mask[:, : width + i] for i in range(1, new)]
    pasts = [0, 0] + [width + i - 1 for i in range(1, new)]
    calls = [[(layer, i.cpu(), w.cpu()) for layer, i, w in forward] for forward in capture.forwards]
    want = expected_rows(calls, masks, [0] + [batch] * new, pasts)
    got = recorded_rows(run)
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got[want.columns[:5]], want[want.columns[:5]], check_dtype=False)
    np.testing.assert_array_equal(got.weight.to_numpy(np.float32), want.weight.to_numpy(np.float32))


def _docs_table() -> dict[str, list[str]]:
    """model type -> the cells of its row in docs/models.md's tables."""
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_docs_list_every_installed_type_and_the_same_gaps():
    rows = _docs_table()
    missing = sorted(set(MODEL_TYPES) - set(rows))
    assert not missing, f"docs/models.md does not list {missing}"
    gaps = {t for t, cells in rows.items() if t in MODEL_TYPES and cells[2].lower().startswith("gap")}
    assert gaps == set(GAPS), "docs/models.md and GAPS disagree"
