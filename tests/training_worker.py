"""One rank of tests/test_training.py's two-process run: `torchrun --nproc_per_node 2 THIS OUT`.

Trains the tiny model with a Trainer under gloo (accelerate sets it up from torchrun's
environment), with rs.watch and the test's router tap; saves the tap's forwards per rank and
rank 0's log history.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import routescope as rs  # noqa: E402
from tests.test_training import RouterTap, trainer_for  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
trainer = trainer_for(
    out, "dist", per_device_train_batch_size=2, max_steps=2, report_to=[], ddp_backend="gloo"
)
tap = RouterTap(trainer.model, step_of=lambda: trainer.state.global_step + 1)
rs.watch(trainer, out_dir=out / "run")
trainer.train()
tap.remove()
torch.save(tap.forwards, out / f"tap{rank}.pt")
if rank == 0:
    (out / "logs.json").write_text(json.dumps(trainer.state.log_history))
