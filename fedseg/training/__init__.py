"""Networks built from plans, losses, the batchgenerators pipeline, local training, inference, metrics.

Import the submodules directly (`fedseg.training.trainer`, ...): this package imports
nothing itself, so `fedseg.training.metrics` stays usable without torch.
"""
