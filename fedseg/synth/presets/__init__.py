"""The synthetic generators, one module per preset (registered in fedseg.synth.registry).

Each module builds its sites from fedseg.synth.common (and `tiny5` from `tiny`); none imports
the registry, which sits above them.
"""
