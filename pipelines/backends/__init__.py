"""The two ways an `EpochPlan` becomes `Batch`es: `dali.py` (DALI, its GPU graph or the same graph
on the CPU) and `torch_loader.py` (torch DataLoader workers, the fallback and the baseline). Both
read through `ShardSet.read_batch` and draw augmentation with `pipelines.augment`, so a caller
cannot tell them apart except by speed."""
