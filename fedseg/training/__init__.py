"""Networks built from plans, preprocessing of a case for a plan, losses, the batchgenerators pipeline,
local training, inference, metrics.

Import the submodules directly (`fedseg.training.trainer`, ...): this package imports
nothing itself, so `fedseg.training.metrics` stays usable without torch.
"""
