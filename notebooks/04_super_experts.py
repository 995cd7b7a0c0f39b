# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Super Experts
#
# A *Super Expert* (Su et al. 2025, arXiv 2507.23279) is one of the very few experts whose
# down-projection produces extreme output values; those outliers create the *massive
# activations* in the residual stream that attention sinks depend on, so pruning a
# single Super Expert can wreck a model while pruning an ordinary one barely matters.
#
# `rs.find_super_experts(model, batches)` runs a short calibration, records for every
# routed and shared expert the largest |output| of its down-projection, and flags an
# expert when that value is above the 99.5th percentile of all experts **and** above a
# tenth of the largest, in the early layers where massive activations are built (the
# first 75 % of the decoder layers).

# %%
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
from transformers import AutoModelForCausalLM, AutoTokenizer

import routescope as rs
from routescope import plots

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 4)

MODEL_DIR, CORPUS = rs.bundled.model_path(), rs.bundled.corpus_path()  # data/ beside the package
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
records = [json.loads(line) for line in CORPUS.open(encoding="utf-8") if line.strip()]
texts_by_domain = {}
for r in records:
    texts_by_domain.setdefault(r["domain"], []).append(r["text"])

WORK = Path(tempfile.mkdtemp(prefix="routescope-notebook-"))  # runs go here, not into the repo
print(f"{model.config.model_type}: {model.config.num_hidden_layers} layers, "
      f"{model.config.num_experts} experts, top-{model.config.num_experts_per_tok}")
print({d: len(t) for d, t in texts_by_domain.items()}, "held-out texts; runs in", WORK)

# %% [markdown]
# ## 1. Calibration on the bundled model
#
# Two batches of held-out texts, two per domain, as calibration data: each batch is a
# dict of model inputs (a list of strings works too, with `tokenizer=`). The result has
# one row per expert, largest output first; `attrs["thresholds"]` holds the thresholds
# that were applied and the layers searched. Even a tiny, briefly trained model can
# grow an expert whose output towers over the rest: the scatter shows how far every
# expert is from the two dashed thresholds.

# %%
calibration = [t[:400] for d in sorted(texts_by_domain) for t in texts_by_domain[d][:2]]
batches = []
for i in range(0, len(calibration), 4):
    enc = tokenizer(calibration[i : i + 4], return_tensors="pt", padding=True, truncation=True, max_length=96)
    batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
found = rs.find_super_experts(model, batches, progress=False)
th = found.attrs["thresholds"]
print({k: th[k] for k in ("percentile_threshold", "max_threshold", "layers")})
found.head(8)

# %%
plots.super_expert_scatter(found, th["percentile_threshold"], th["max_threshold"])

# %% [markdown]
# The same pass measures the residual stream after every decoder layer. A *massive
# activation* (Sun et al. 2024) is a value above 100 and above 1000 × the median |h|;
# in large models they appear right after the layer that holds a Super Expert.

# %%
hidden = pd.DataFrame(found.attrs["hidden_stats"])
plots.massive_activation_figure(hidden)

# %% [markdown]
# ## 2. A planted Super Expert
#
# To see the detector fire, build a tiny Qwen3-MoE model from a config (random weights,
# 4 layers, 8 experts) and plant a Super Expert: scale the down-projection of expert 5 in
# layer 1 by 300. Its outputs become two orders of magnitude larger than any other
# expert's — the signature the detector looks for.

# %%
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

torch.manual_seed(0)
config = Qwen3MoeConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    max_position_embeddings=256, pad_token_id=0,
)
tiny = Qwen3MoeForCausalLM(config).eval()
PLANTED = (1, 5)
with torch.no_grad():  # fused experts: down_proj is one tensor indexed by expert
    tiny.model.layers[PLANTED[0]].mlp.experts.down_proj[PLANTED[1]] *= 300.0

gen = torch.Generator().manual_seed(0)
tiny_batches = [{"input_ids": torch.randint(1, 256, (4, 32), generator=gen)} for _ in range(3)]
tiny_found = rs.find_super_experts(tiny, tiny_batches, progress=False)
flagged = [(int(r.layer), int(r.expert)) for r in tiny_found[tiny_found["is_super"]].itertuples()]
print("flagged:", flagged, "planted:", PLANTED)
assert PLANTED in flagged
tiny_found.head(5)

# %%
t = tiny_found.attrs["thresholds"]
plots.super_expert_scatter(tiny_found, t["percentile_threshold"], t["max_threshold"])


# %% [markdown]
# ## 3. The pruning check
#
# The paper's test of a Super Expert: prune it (zero its down-projection) and watch the
# model's outputs change far more than when pruning an ordinary expert of the same layer.
# `rs.prune_experts(model, [(layer, expert)])` is a context manager: the experts are
# pruned inside the block and restored exactly on exit. We measure the mean KL divergence
# of the next-token distribution from the unpruned model's, on the same inputs.

# %%
def next_token_logprobs(model, batches):
    with torch.no_grad():
        return [torch.log_softmax(model(**b).logits.float(), -1) for b in batches]

def prune_effect(model, experts, batches):
    """Mean KL(unpruned || pruned) per token when `experts` are pruned."""
    reference = next_token_logprobs(model, batches)
    with rs.prune_experts(model, experts):
        pruned = next_token_logprobs(model, batches)
    kl = [torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
          for p, q in zip(reference, pruned)]
    return float(torch.cat([k.flatten() for k in kl]).mean())

ordinary = (PLANTED[0], (PLANTED[1] + 1) % config.num_experts)
effect = pd.DataFrame(
    [
        {"pruned": f"Super Expert L{PLANTED[0]}/e{PLANTED[1]}",
         "mean_kl": prune_effect(tiny, [PLANTED], tiny_batches)},
        {"pruned": f"ordinary L{ordinary[0]}/e{ordinary[1]}",
         "mean_kl": prune_effect(tiny, [ordinary], tiny_batches)},
    ]
)
effect

# %%
import plotly.express as px

fig = px.bar(effect, x="pruned", y="mean_kl", log_y=True, template=plots.TEMPLATE,
             title="Output change after pruning one expert (mean KL per token, log scale)")
fig.update_traces(marker_color=[plots.STATE_COLORS["super"], plots.STATE_COLORS["normal"]])
fig

# %% [markdown]
# The same check on the bundled model: prune the expert with the largest output (flagged
# or not) and, for comparison, the expert with the median output of the same layer.

# %%
routed = found[~found["shared"]]
top = routed.iloc[0]
same_layer = routed[routed["layer"] == top["layer"]].sort_values("max_abs_output")
median = same_layer.iloc[len(same_layer) // 2]
pd.DataFrame(
    [
        {"pruned": f"{name} L{int(e.layer)}/e{int(e.expert)}", "is_super": bool(e.is_super),
         "max_abs_output": e.max_abs_output,
         "mean_kl": prune_effect(model, [(int(e.layer), int(e.expert))], batches)}
        for name, e in (("largest output", top), ("median output", median))
    ]
)

# %% [markdown]
# Run this check on every expert the detector flags before trusting it: a flagged expert
# whose pruning changes nothing is a false positive of the thresholds.
# `find_super_experts` takes the percentile (`quantile`), the `ratio` and the `layers`
# searched as parameters.

# %% [markdown]
# The runs of this notebook were written to a temporary folder (`WORK`); the last cell
# removes it. Skip it to keep them, e.g. to open them with `routescope dashboard`.

# %%
shutil.rmtree(WORK, ignore_errors=True)
