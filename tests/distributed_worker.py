"""Run one recovery of a tiny model, as one process or under torchrun; rank 0 saves what it saw.

Used by test_distributed.py: the same script with the same arguments, launched by ``torchrun
--nproc-per-node 2`` or by plain ``python``, must train the same way.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_byte_tokenizer, make_tiny_model  # noqa: E402

from cfsp.recovery import RecoveryConfig, recover  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True, help="RecoveryConfig fields as JSON")
parser.add_argument("--data", required=True)
parser.add_argument("--checkpoints", required=True)
parser.add_argument("--result", required=True)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)
config = RecoveryConfig(**json.loads(args.config))
teacher = make_tiny_model("llama", seed=0)
student = copy.deepcopy(teacher)
with torch.no_grad():  # a student that differs from its teacher
    for layer in student.model.layers:
        layer.mlp.down_proj.weight.mul_(0.5)
result = recover(
    student,
    make_byte_tokenizer(),
    args.data,
    [1.0, 2.0, 3.0, 4.0],
    config,
    output_dir=args.checkpoints,
    resume=args.resume,
    teacher=teacher if config.objective != "lm" else None,
)
if result.model is not None:
    torch.save(
        {
            "losses": [e["loss"] for e in result.log_history if "loss" in e],
            "eval": [e["eval_loss"] for e in result.log_history if "eval_loss" in e],
            "tokens": result.tokens_seen,
            "processes": result.processes,
            "sharded": result.sharded,
            "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        },
        args.result,
    )
