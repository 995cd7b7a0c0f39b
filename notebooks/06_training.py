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
# # Routing health during training
#
# Routers change while a model trains: an expert can die, a few can run hot, and the
# auxiliary loss can hide it. `rs.watch(trainer)` adds routing scalars to every training log
# of a Hugging Face `Trainer` (or a TRL trainer): per MoE layer the cv, max violation,
# normalised entropy, dead fraction and z-loss, plus the model's aux loss and z-loss. They
# land in `trainer.state.log_history` and in every reporter (`report_to`: TensorBoard, W&B,
# ...). The counts stay on the device and are read once per log, and the loss is unchanged.
#
# Here we fine-tune the bundled tiny Qwen3-MoE model for a few steps on its bundled corpus.

# %%
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import plotly.express as px
import torch

warnings.filterwarnings("ignore")
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

import routescope as rs

torch.manual_seed(0)
workdir = Path(tempfile.mkdtemp(prefix="routescope_training_"))
tokenizer = AutoTokenizer.from_pretrained(rs.bundled.model_path())
model = AutoModelForCausalLM.from_pretrained(rs.bundled.model_path())
lines = [line for line in rs.bundled.corpus_path().read_text().splitlines() if line.strip()][:64]
dataset = Dataset.from_dict({"text": lines}).map(
    lambda row: tokenizer(row["text"], truncation=True, max_length=48), remove_columns=["text"]
)

# %% [markdown]
# ## Watch a Trainer
#
# One call before `train()`. `out_dir` also records the tokens, each with the optimizer step
# its gradients went into (`train_step`), so the run can be analysed step by step afterwards.
# Padding never counts, as when recording inference.

# %%
args = TrainingArguments(
    str(workdir / "trainer"),
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    max_steps=8,
    logging_steps=2,
    learning_rate=3e-3,
    report_to=[],  # e.g. ["tensorboard"]: the same scalars land there
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=dataset,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
)
watch = rs.watch(trainer, out_dir=workdir / "run")
trainer.train()

# %% [markdown]
# Every training log now carries the routing scalars next to the loss. With gradient
# accumulation a log covers every micro-batch since the previous log.

# %%
logs = pd.DataFrame([h for h in trainer.state.log_history if "loss" in h]).set_index("step")
logs[["loss", "routing/aux_loss", "routing/z_loss", "routing/max_violation_max", "routing/dead_fraction_mean"]]

# %% [markdown]
# Per layer, over the logged steps: `routing/layer_{l}/max_violation` says how far the
# hottest expert of layer `l` is above its fair share (0 = perfectly balanced).

# %%
per_layer = logs.filter(regex=r"routing/layer_\d+/max_violation").rename(
    columns=lambda key: key.split("/")[1]
)
px.line(per_layer, markers=True, labels={"value": "max_violation", "variable": "layer"})

# %% [markdown]
# ## The recorded run, by optimizer step
#
# The tokens carry an integer `train_step`, so every metric works per optimizer step, finer
# than the logs here (each log covers two steps, `logging_steps=2`).

# %%
run = rs.open_run(workdir / "run")
run.sql("SELECT train_step, count(*) AS tokens FROM tokens GROUP BY 1 ORDER BY 1")

# %%
run.balance(where="train_step = 8")

# %% [markdown]
# ## A custom training loop
#
# Without a `Trainer`, use `rs.watch(model)` as a context manager and call `end_step()` once
# per optimizer step; it returns the same scalars for the tokens since the previous call.
# Forwards made under `model.eval()` are not counted.

# %%
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
model.train()
rows = []
with rs.watch(model) as loop_watch:
    for start in range(0, 32, 8):
        batch = collate([dataset[i] for i in range(start, start + 8)])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rows.append(loop_watch.end_step())
pd.DataFrame(rows)[["routing/aux_loss", "routing/z_loss", "routing/max_violation_max", "routing/tokens"]]

# %% [markdown]
# docs/training.md explains each scalar, how it differs from Megatron-Core's, NeMo's and
# transformers' own definitions, the alerts (`watch.alerts.raised`), and the cost.

# %%
watch.alerts.raised
