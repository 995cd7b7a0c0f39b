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
# # Comparing two runs
#
# A routing change shows up as load moving between experts, a shift in balance, or a
# router that becomes more or less decisive (*saturated*). Here run A is the bundled
# model and run B a perturbed copy whose router weights are sharpened (×2) and
# perturbed with noise — a stand-in for a fine-tune, a quantization, or a new checkpoint.
# Both runs see the same texts. A second comparison contrasts two datasets on one model.

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


# %%
def record_by_domain(model, out_dir, per_domain=12, max_length=128, batch_size=4, **options):
    """Record `per_domain` held-out texts of every domain, labelled with their domain."""
    with rs.record(model, out_dir, **options) as rec, torch.no_grad():
        for domain, texts in sorted(texts_by_domain.items()):
            rec.set_labels(domain=domain)  # applies to the forwards that follow
            for i in range(0, per_domain, batch_size):
                enc = tokenizer(texts[i : min(i + batch_size, per_domain)], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return rs.open_run(out_dir)


# %% [markdown]
# ## 1. The perturbed copy
#
# In Qwen3-MoE the router is the `gate` of each sparse MLP block: a linear map from the
# hidden state to one logit per expert. Scaling its weights by 2 halves the softmax
# temperature (more saturated routing); the noise reshuffles which expert wins.

# %%
import copy

perturbed = copy.deepcopy(model)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for layer in perturbed.model.layers:
        w = layer.mlp.gate.weight
        w.mul_(2.0).add_(0.5 * w.std() * torch.randn(w.shape, generator=gen))

run_a = record_by_domain(model, WORK / "original", per_domain=6, router_stats=True)
run_b = record_by_domain(perturbed, WORK / "perturbed", per_domain=6, router_stats=True)
run_a.manifest["tokens"], run_b.manifest["tokens"]

# %% [markdown]
# `rs.compare(a, b)` returns a `Comparison` of B against A: `load` (per layer and expert,
# shares in A and B and their difference), `balance` (every balance metric in A, B and
# the delta), `expert_changes` (experts that died, revived, became hot or cooled) and
# `saturation` (below). It renders as a summary in the notebook.

# %%
diff = rs.compare(run_a, run_b)
diff

# %%
diff.expert_changes

# %%
plots.load_delta_heatmap(diff.load)

# %%
plots.balance_change_figure(diff.balance)

# %% [markdown]
# ## 2. Router saturation
#
# *Router saturation* (OLMoE's term) asks how many routing decisions survive the change:
# over the tokens present in both runs (same sequence, position and token id), the mean
# fraction of a token's top-k experts that are the same in A and B. 1.0 means the
# perturbation changed no decision; k/E is what two unrelated routers share by chance. `top1_agreement` is the same for the first choice alone.

# %%
print(diff.notes or "no notes")
plots.saturation_figure(diff.saturation)

# %% [markdown]
# Saturation says whether decisions changed; the router's *confidence* is another matter.
# Sharpening the router makes it more decisive: the mean combine weight of slot 0 rises
# (for top-2 with renormalized weights it lies between 0.5 and 1), and with
# `router_stats=True` the `router_tokens` table shows the normalized entropy of the full
# router distribution falling (0 = all mass on one expert) and the top-1 − top-2
# probability margin growing.

# %%
TOP1 = "SELECT layer, avg(weight) AS top1_weight FROM routing WHERE slot = 0 GROUP BY layer ORDER BY layer"
decisiveness = run_a.sql(TOP1).merge(run_b.sql(TOP1), on="layer", suffixes=("_a", "_b"))
decisiveness

# %%
import plotly.express as px

ROUTER = "SELECT layer, avg(entropy) AS entropy, avg(margin) AS margin FROM router_tokens GROUP BY layer"
router = pd.concat([run_a.sql(ROUTER).assign(run="A: original"), run_b.sql(ROUTER).assign(run="B: perturbed")])
router = router.merge(pd.concat([run_a.sql(TOP1).assign(run="A: original"),
                                 run_b.sql(TOP1).assign(run="B: perturbed")]), on=["layer", "run"])
tidy = router.melt(id_vars=["layer", "run"], value_vars=["top1_weight", "entropy", "margin"], var_name="measure")
fig = px.bar(tidy.sort_values("layer").assign(layer=lambda d: "L" + d["layer"].astype(str)), x="layer", y="value",
             color="run", barmode="group", facet_col="measure", template=plots.TEMPLATE,
             color_discrete_sequence=list(plots.RUN_COLORS), title="Router decisiveness per layer")
fig.update_yaxes(matches=None, showticklabels=True)
fig


# %% [markdown]
# ## 3. Two datasets, one model
#
# The same tools compare data instead of models: A is the bundled model on code, B on
# multilingual text. Both slices come from one run through `where=` on the `domain`
# label (two separate runs would work the same way). Here the change in load is the
# model's own specialization.

# %%
def side_by_side(a, b, keys):
    """Two metric frames as one, columns suffixed _a and _b."""
    return a.merge(b, on=keys, how="outer", suffixes=("_a", "_b"))

code_only, multi_only = "domain = 'code'", "domain = 'multilingual'"
plots.load_delta_heatmap(side_by_side(run_a.expert_load(where=code_only),
                                      run_a.expert_load(where=multi_only), ["layer", "expert"]))

# %%
plots.balance_change_figure(side_by_side(run_a.balance(where=code_only),
                                         run_a.balance(where=multi_only), ["layer"]))

# %% [markdown]
# The runs of this notebook were written to a temporary folder (`WORK`); the last cell
# removes it. Skip it to keep them, e.g. to open them with `routescope dashboard`.

# %%
shutil.rmtree(WORK, ignore_errors=True)
