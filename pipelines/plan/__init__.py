"""Which samples each rank yields, in which order: the epoch plan (Mosaic Streaming's `shuffle/`).

- `epoch_plan.py`: `EpochPlan`, a keyed permutation of the epoch (global, block or none) split
  over ranks, O(batch) per batch, and the arithmetic of an elastic resume.
- `permutation.py`: the keyed bijections (Feistel with cycle walking) and hashes everything
  random in the loader is a function of.
- `mixing.py`: several sources as one epoch (weights as repeat factors, fractional windows).
"""
