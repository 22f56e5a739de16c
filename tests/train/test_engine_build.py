"""`build_engine` in a fresh process with the workers' environment (`launch.worker_env`): a ZeRO engine is
built and steps without torch's compiler stack.

DeepSpeed's ZeRO imports its Muon optimizer module on `initialize` and in the first backward (to
recognise Muon), and that module's `torch.compile` decorators import torch's inductor: 1.3 s of a trial's
engine build on 2 cores (its `compile_fx`, and dynamo's debug utilities). scalelab never compiles, so
the workers run with TorchDynamo disabled, which makes those decorators no-ops. Checked in a new
interpreter (this one may have imported the compiler for other reasons), with a real single-rank gloo
group and a real DeepSpeed engine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", DS_ACCELERATOR="cpu")
from scalelab.config import ExperimentConfig, validate
from scalelab.train.launch import worker_env
cfg = validate(ExperimentConfig, {"model": {"preset": "pico"}, "optim": {"name": "adamw", "lr": 1e-2},
               "train": {"global_batch": 8, "micro_batch_size": 8, "zero_stage": 2, "precision": "fp32"}})
os.environ.update(worker_env(cfg))  # what Ray Train gives the workers, before torch is imported
import torch, torch.distributed as dist
from scalelab.models import create_model
from scalelab.train.engine import build_engine
dist.init_process_group("gloo", rank=0, world_size=1)
model = create_model("pico")
engine, optimizer = build_engine(model, cfg, world_size=1)
before = [p.detach().clone() for p in engine.module.parameters()]
for p in engine.module.parameters():
    p.grad = None
loss = sum(p.float().pow(2).sum() for p in engine.module.parameters())
engine.backward(loss)
engine.step()
moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, engine.module.parameters()))
print(json.dumps({"engine": type(engine).__name__, "optimizer": type(optimizer).__name__, "moved": moved,
                  # the compiler stack torch.compile pulls in (inductor's compile_fx: 0.7 s; dynamo's
                  # debug and test utilities: 0.5 s); a lighter part of inductor comes with torchvision
                  "compiler": sorted({"torch._inductor.compile_fx", "torch._dynamo.testing"}
                                     & set(sys.modules)),
                  "muon": "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules}))
"""


def test_a_zero_engine_is_built_and_steps_without_torchs_compiler_stack():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(port)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["engine"] == "DeepSpeedEngine" and got["optimizer"] == "DeepSpeedZeroOptimizer"  # ZeRO-2
    assert got["moved"] > 0  # it trains
    assert got["muon"] is True  # DeepSpeed imported its Muon module, as it always does...
    assert got["compiler"] == []  # ...without its torch.compile decorators importing the compiler
