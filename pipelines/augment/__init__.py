"""What happens to an image between its bytes and the model, outside the DALI graph: `images.py`
(decode as DALI decodes, header sizes) and `transforms.py` (the augmentation spec and its keyed
draws: crop windows and flips as functions of (seed, epoch, sample))."""
