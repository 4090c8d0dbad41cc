"""Weight exchange between sites: the file format, validation, the aggregation engine, strategies.

Nothing in this package imports torch at module level: `fedseg aggregate` runs with numpy and
safetensors only. Functions that need a network (`initial_round`, `attach_manifests`,
`Strategy.network`) import torch inside the function.
"""
