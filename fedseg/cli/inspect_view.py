"""`fedseg inspect`: recognise a fedseg file and summarise it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedseg.errors import InputError


def inspect_file(path: Path, as_json: bool = False) -> None:
    """Summarise a fedseg file, or a run folder (then: its status, as `fedseg status` shows it)."""
    if path.is_dir():
        _inspect_run_folder(path, as_json)
        return
    if not path.is_file():
        raise InputError("not found (expected a fedseg file or a run folder)", path)
    summary = summarise(path)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not str: values like [true] or [1, 2] are data, not rich markup to interpret
    table = Table(title=Text(f"{path} ({summary['type']})"), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        if key == "type":
            continue
        table.add_row(Text(str(key)), Text(_cell(value)))
    Console().print(table)


def _inspect_run_folder(path: Path, as_json: bool) -> None:
    from fedseg.cli.run_commands import format_status
    from fedseg.federation.run_status import run_status

    if not (path / "plans.json").is_file():
        raise InputError("is a folder without plans.json; inspect takes a fedseg file or a run folder", path)
    state = run_status(path)
    if as_json:
        print(json.dumps(state.to_dict(), indent=2, default=str))
    else:
        print(format_status(state))


def _cell(value: Any) -> str:
    """A table cell: strings as they are, a dict of strings one "key: value" per line, else JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
        return "\n".join(f"{k}: {v}" for k, v in value.items())
    return json.dumps(value, default=str)


def summarise(path: Path) -> dict[str, Any]:
    if path.name.endswith(".safetensors"):
        return _weight_file(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("neither a weight file (.safetensors) nor a JSON file fedseg knows", path) from None
    if not isinstance(obj, dict):
        raise InputError("not a fedseg file", path)
    if "configurations" in obj and "plan_id" in obj:
        return _plans(path)
    if "foreground_stats_per_channel" in obj:
        return _fingerprint(obj)
    if "per_case" in obj:
        return {"type": "metrics", "mean": obj.get("mean"), "foreground_mean": obj.get("foreground_mean"),
                "cases": len(obj["per_case"])}
    if "inputs" in obj and "round" in obj:
        return {"type": "aggregate record", **{k: obj[k] for k in obj if k != "type"}}
    if "val_dice_per_round" in obj:
        return {"type": "run summary (report/metrics.json)", **obj}
    raise InputError(
        "a JSON file, but not one fedseg knows (fingerprint, plans, metrics, aggregate record, run summary)", path
    )


def _weight_file(path: Path) -> dict[str, Any]:
    import math

    from fedseg.federation.weightfile import open_weight_file

    # the content hash is streamed from the memory-mapped file: no tensor is copied, whatever
    # the file declares (inspect has no plan to check the header against)
    with open_weight_file(path) as reader:
        reader.verify_hash()
        infos, meta = reader.infos, reader.meta
    n_params = int(sum(math.prod(i.shape) for i in infos.values()))
    n_bytes = int(sum(i.end - i.begin for i in infos.values()))
    pools: dict[str, int] = {}
    for name in infos:
        pool = meta.scopes.get(name, "?")
        pools[pool] = pools.get(pool, 0) + 1
    return {
        "type": f"weight file ({meta.kind})",
        "plan_id": meta.plan_id,
        "strategy": meta.strategy,
        "site": meta.site,
        "round": meta.round,
        "n_cases": meta.n_cases,
        "n_iterations": meta.n_iterations,
        "tensors": len(infos),
        "parameters": n_params,
        "bytes": n_bytes,
        "tensors per pool": pools,
        "content_hash": meta.content_hash,
        "fedseg_version": meta.fedseg_version,
        "extra": meta.extra,
    }


def _plans(path: Path) -> dict[str, Any]:
    from fedseg.federation.routes import ROUTES_KEY, route_table, routes_by_module, summarise_routes
    from fedseg.planning.plans import load_plans

    plans = load_plans(path)
    out: dict[str, Any] = {
        "type": "plans",
        "plan_id": plans.plan_id,
        "strategy": {"name": plans.strategy.name, "params": plans.strategy.params},
        "sites": {name: {"modality": s.modality, "channels": s.channels, "n_cases": s.n_cases,
                         "configuration": s.configuration or plans.default_configuration}
                  for name, s in plans.sites.items()},
        "labels": plans.labels,
        "training": vars(plans.training),
    }
    for name, cfg in plans.configurations.items():
        out[f"configuration {name}"] = {
            "spacing": [round(s, 4) for s in cfg.spacing],
            "patch_size": cfg.patch_size,
            "batch_size": cfg.batch_size,
            "normalization": cfg.normalization_schemes,
            "use_mask_for_norm": cfg.use_mask_for_norm,
            "stages": cfg.network.n_stages,
            "features": cfg.network.features_per_stage,
            "strides": cfg.network.strides,
        }
    fp = plans.fingerprint
    out["intensity (merged)"] = fp.get("foreground_intensity_properties_per_channel")
    for key, value in plans.extra.items():
        if key == ROUTES_KEY:
            table = route_table(plans)
            out["route table"] = summarise_routes(table)
            for site, modules in routes_by_module(table).items():
                out[f"routes of {site} (by module)"] = modules
        elif key != "manifests":
            out[key] = value
    if "manifests" in plans.extra:
        out["tensors per configuration"] = {k: len(v) for k, v in plans.extra["manifests"].items()}
    return out


def _fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    stats = fp["foreground_stats_per_channel"]
    channels = {}
    for channel, s in stats.items():
        count = s["count"]
        mean = s["sum"] / count if count else float("nan")
        channels[channel] = {"voxels": count, "mean": round(mean, 4), "min": s["min"], "max": s["max"]}
    return {
        "type": "fingerprint",
        "site": fp.get("site"),
        "modality": fp.get("modality"),
        "channels": fp.get("channel_names"),
        "labels": fp.get("labels"),
        "n_cases": fp.get("n_cases"),
        "spacings (first 3)": fp.get("spacings", [])[:3],
        "foreground per channel": channels,
    }
