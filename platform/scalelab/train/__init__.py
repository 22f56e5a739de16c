"""Training package: DeepSpeed engine adapter, per-worker loop, checkpoint/resume, schedules, compute.

Engine-free pieces live in their own modules and import no framework at load time:
`optim` (parameter groups, optimizer factory), `schedule` (pure learning-rate curve), `ds_config`
(the DeepSpeed config dict and the gradient-cache batch geometry) and `compute` (MAC accounting).
This `__init__` deliberately imports nothing, so `import scalelab.train.schedule` never pulls in
deepspeed or ray; import the submodule you need.
"""
