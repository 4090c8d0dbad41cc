"""Weight exchange between sites: the file format, the plan's route table, validation,
aggregation, the strategies' aggregation rules, privacy, signing, run folders.

`fedseg aggregate` runs with numpy and safetensors only: the aggregation path
(`aggregation`, `validation`, `routes`, `strategies`, ...) imports no torch. The modules that
build networks import it at their top and are never on that path: `plan_building` (the
manifests at plan time), `round_zero` (round 0), `site_training` (a site's round) and the
nnU-Net interchange modules.
"""
