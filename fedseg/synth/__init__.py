"""Synthetic multi-site federations (`fedseg synth`): the preset registry and the generators.

Layering: fedseg.synth sits beside fedseg.planning, above fedseg.data (it writes images with
fedseg.data.image_io) and below everything that generates sites (cli, tests, benchmarks).
"""

from fedseg.synth.common import SyntheticCase, SyntheticSite, write_site
from fedseg.synth.registry import PRESETS, Preset, generate, preset_names

__all__ = ["PRESETS", "Preset", "SyntheticCase", "SyntheticSite", "generate", "preset_names", "write_site"]
