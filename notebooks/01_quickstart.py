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
# # routescope quickstart
#
# Record every routing decision of a Mixture-of-Experts model, open the run, and check
# its routing health: how evenly the experts share the load, and which experts are dead
# (never chosen) or hot (chosen far more than their fair share).
#
# We use the tiny Qwen3-MoE model bundled with routescope (`data/model`) and its held-out
# corpus (`data/sample.jsonl`, four domains: code, math, multilingual, prose). Everything
# runs offline on a CPU in about a minute.

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
# ## 1. Record
#
# `rs.record(model, out_dir, labels=...)` adds hooks to every router, and writes one row
# per (token, MoE layer, slot) to Parquet while the model runs. `rec.set_labels(...)`
# changes the labels of the forwards that follow, so each token carries the domain of
# the text it came from. The hooks are removed when the block ends.

# %%
run_dir = WORK / "quickstart"
with rs.record(model, run_dir, labels={"domain": "unset"}) as rec, torch.no_grad():
    for domain, texts in sorted(texts_by_domain.items()):
        rec.set_labels(domain=domain)
        for i in range(0, 12, 4):  # 12 texts per domain, 4 per batch
            enc = tokenizer(texts[i : i + 4], return_tensors="pt", padding=True,
                            truncation=True, max_length=128)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
print(sorted(p.name for p in run_dir.iterdir()))

# %% [markdown]
# ## 2. Open the run
#
# `rs.open_run` returns a `Run`. In a notebook it renders as a summary of its manifest
# and the headline metrics. `run.sql(...)` queries the `tokens` and `routing` views with
# DuckDB and returns a DataFrame; padding tokens are never recorded.

# %%
run = rs.open_run(run_dir)
run

# %%
run.sql("""
    SELECT domain, count(*) AS tokens, count(DISTINCT seq_id) AS sequences
    FROM tokens GROUP BY domain ORDER BY domain
""")

# %%
run.sql("SELECT * FROM routing ORDER BY seq_id, pos, layer, slot LIMIT 6")

# %% [markdown]
# ## 3. Load balance
#
# `run.balance()` gives one row per MoE layer. `cv` (coefficient of variation of the
# expert loads) and `max_violation` (how far the busiest expert is above the mean, as a
# fraction of the mean) are 0 for a perfectly even layer; `balancedness` (mean / max
# load) and `norm_entropy` (entropy of the load shares over ln E) are 1. A layer whose
# `max_violation` is 1.0 sends its busiest expert twice the average load.

# %%
balance = run.balance()
balance

# %%
plots.balance_figure(balance)

# %% [markdown]
# The heatmap shows every expert of every layer at once, as lift = share × E: white is a
# fair share, red more, blue less (log scale).

# %%
load = run.expert_load()
plots.load_heatmap(load, value="lift")

# %% [markdown]
# ## 4. Dead and hot experts
#
# A dead expert received no token at all. How much that means depends on how many tokens
# were seen: a uniform router misses one given expert for all T tokens with probability
# (1 − k/E)^T, astronomically small for the few thousand tokens here, but not for a
# handful of decode tokens. A hot expert has at least twice the uniform share 1/E;
# `ratio` says how many times the uniform share it gets.

# %%
dead = run.dead_experts()
hot = run.hot_experts(factor=2.0)
T, E, k = run.manifest["tokens"], run.num_experts(run.moe_layers[0]), run.top_k(run.moe_layers[0])
print(f"{len(dead)} dead and {len(hot)} hot experts over {T} tokens; "
      f"P(a given expert gets no token | uniform router) = {(1 - k / E) ** T:.1e}")
hot.sort_values("ratio", ascending=False).head(10)

# %% [markdown]
# The bars show one layer, the least balanced one: the dashed line is the uniform share,
# red bars are hot experts and grey bars dead ones.

# %%
worst = int(balance.sort_values("cv", ascending=False)["layer"].iloc[0])
plots.expert_bars(load, layer=worst)

# %% [markdown]
# Every metric method takes `where=`, a SQL predicate over the `tokens` view, so the same
# question can be asked of one slice of the data:

# %%
by_domain = pd.concat(
    [run.balance(where=f"domain = '{d}'").assign(domain=d) for d in sorted(texts_by_domain)]
)
by_domain.pivot(index="layer", columns="domain", values="cv")

# %% [markdown]
# Next: `02_load_balance` (layers, prefill vs decode, steps), `03_entanglement_and_specialization`,
# `04_super_experts`, `05_compare_runs`.

# %% [markdown]
# The runs of this notebook were written to a temporary folder (`WORK`); the last cell
# removes it. Skip it to keep them, e.g. to open them with `routescope dashboard`.

# %%
shutil.rmtree(WORK, ignore_errors=True)
