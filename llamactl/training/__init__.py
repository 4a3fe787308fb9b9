"""Training: each module one job.

- ``distributed``: the process group, FSDP2 sharding and materialisation of meta-device models, DDP.
- ``checkpoints``: run checkpoints (DCP folders that reshard) and the final files streamed out of them.
- ``loop``: ``Task``, ``fit``, the optimizer, the schedule, MFU.
- ``lifecycle``: the one run lifecycle that pretrain, sft, train-rm and ppo call.
"""
