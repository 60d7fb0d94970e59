"""Running one model over several processes (tensor parallel) with torch.distributed.

SPMD: every rank of a group runs the same engine on the same requests; the model's heads, MLP
columns and vocabulary are split over the ranks (workers/parallel/shard.py), the few collectives
sit in the parallel layers (workers/parallel/layers.py) and in the sampler (workers/sampling.py),
and since every rank then sees the same merged confidences it takes the same commit decisions.
"""
