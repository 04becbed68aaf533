"""Lightning strategies, one file each, sharing one mesh (parallel/mesh.py) and one checkpoint contract
(parallel/checkpoint.py): expert_parallel (DDP or FSDP2 + experts sharded by id), and the engines built on it."""
