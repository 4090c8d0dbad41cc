"""Commands that read site data and make the plan: synth, fingerprint, plan, inspect."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from fedseg.cli.options import (
    BUDGET, JSON, MAX_VOXELS, QUIET, STRATEGY, parse_set_options, require_dir, require_file, require_output_dir,
    require_output_file,
)


def synth(
    out: Path = typer.Argument(..., help="Folder to create; one nnU-Net raw folder per site inside."),
    preset: str = typer.Option("tiny", "--preset", help="Which synthetic federation to generate (see the list above)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same data)."),
    quiet: bool = QUIET,
) -> None:
    """Generate synthetic multi-site data (nnU-Net raw format, Tr and Ts splits).

    Presets:

    \b
    - tiny: 3 sites, 3D, a bright blob; spacing and intensity differ per site (the demo's)
    - tiny5: 5 sites like tiny, for robust-aggregation tests
    - brain: a real T1 MRI seen through 3 simulated scanners; label = tissue mask
    - fednnunet: 3 sites with 1, 2.5 and 4 mm slices and different fields of view (asymfedavg)
    - flames: 2D PNG, 3 large MRI sites + 2 small ultrasound sites of other organs,
      and a mixed server test set in _server_test/ (flames)
    - mixmfl: 6 sites, 4 MRI sequences, each site holds a different pair (mixmfl)
    - fedfms: 3 sites, 2D fundus-like PNGs, optic disc and cup (fedmsa, fedsam)

    Refuses to write into site folders that already hold files.

    Example: fedseg synth sites --preset tiny --seed 0
    """
    from fedseg.cli.console import Reporter
    from fedseg.synth import generate

    require_output_dir(out, "output folder")
    reporter = Reporter(quiet=quiet)
    site_dirs = generate(out, preset=preset, seed=seed, log=reporter.log)
    reporter.log(f"wrote {len(site_dirs)} site folders under {out}: {', '.join(p.name for p in site_dirs)}")


def fingerprint(
    site: str = typer.Option(..., "--site", help="This site's name, as the plan will know it."),
    data: Path = typer.Option(..., "--data", help="The site's nnU-Net raw dataset folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Fingerprint file to write (JSON)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes reading cases in parallel."),
    max_voxels: int = MAX_VOXELS,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Summarise a site's data as mergeable statistics (no voxel values leave the site).

    Example: fedseg fingerprint --site site_a --data sites/site_a -o fp/site_a.json --workers 2
    """
    from fedseg.cli.console import Reporter, print_json
    from fedseg.data.dataset import load_dataset
    from fedseg.names import check_site_name
    from fedseg.planning.fingerprint import compute_fingerprint, save_fingerprint

    check_site_name(site, what="--site")
    require_output_file(output, "fingerprint file")
    reporter = Reporter(quiet=quiet)
    dataset = load_dataset(require_dir(data, "dataset folder"))
    n_cases = len(dataset.cases("Tr"))
    with reporter.progress(f"fingerprint {site}", n_cases) as advance:
        fp = compute_fingerprint(dataset, site, workers=workers, progress=advance, max_voxels=max_voxels)
    save_fingerprint(fp, output)
    reporter.log(f"wrote {output} ({fp['n_cases']} cases, modality {fp['modality']})")
    if as_json:
        print_json({"site": site, "output": str(output), "n_cases": fp["n_cases"]})


def plan(
    fingerprints: list[Path] = typer.Argument(..., help="Fingerprint files, one per site."),
    strategy: str = STRATEGY,
    output: Path = typer.Option(..., "-o", "--output", help="plans.json to write."),
    config: str = typer.Option("3d_fullres", "--config", help="Configuration: 3d_fullres or 2d."),
    budget: float = BUDGET,
    set_: list[str] = typer.Option(None, "--set", help="Override a planned value or a strategy parameter: key=value (every key: docs/cli.md)."),
    seed: int = typer.Option(1234, "--seed", help="Seed for initial weights and training."),
    keys: Path = typer.Option(None, "--keys", help="Folder of <site>.pub files (fedseg keygen): every file must then be signed."),
    from_nnunet: Path = typer.Option(None, "--from-nnunet", help="Adopt this nnU-Net trained model's configuration (docs/nnunet.md)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Merge site fingerprints exactly and plan the federation (nnU-Net rules).

    With --from-nnunet TRAINER_FOLDER the configuration (spacing, patch, normalisation,
    network) is the nnU-Net model's, so `fedseg init --from-nnunet` can start from its weights.

    With --keys, the plan lists every site's and the coordinator's public key; from then on
    unsigned or wrongly signed weight files are refused (docs/security.md). Privacy options
    (docs/privacy.md): --set secure_aggregation=true (needs --keys: the sites' key-agreement
    keys come from the same .pub files), --set dp.clip=C --set dp.noise_multiplier=S
    [--set dp.delta=D --set dp.max_epsilon=E].

    Example: fedseg plan fp/*.json --strategy fedavg -o plans.json --set training.rounds=3
    """
    from fedseg.cli.console import Reporter
    from fedseg.errors import InputError
    from fedseg.federation.plan_building import build_plans
    from fedseg.federation.privacy import plan_privacy
    from fedseg.federation.signing import load_public_keys
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.fingerprint import load_fingerprint

    require_output_file(output, "plans file")
    if keys is not None:
        require_dir(keys, "keys folder")
    reporter = Reporter(quiet=quiet)
    if config not in ("3d_fullres", "2d"):
        raise InputError(f"--config must be 3d_fullres or 2d, not {config!r}")
    strategy_impl = get_strategy(strategy)   # an unknown strategy is refused before any file is read
    fps = [load_fingerprint(require_file(p, "fingerprint")) for p in fingerprints]
    adopt = None
    if from_nnunet is not None:
        from fedseg.cli.export_commands import adopt_nnunet_plan

        adopt = functools.partial(adopt_nnunet_plan, trainer_folder=from_nnunet)
    plans = build_plans(
        fps, strategy=strategy, configuration=config, overrides=parse_set_options(set_), seed=seed, budget=budget,
        fingerprint_names=[str(p) for p in fingerprints], adopt=adopt,
        keys=load_public_keys(keys) if keys is not None else None,
    )
    plans = plan_privacy(plans, strategy_impl, keys)   # the sites' key-agreement keys from --keys
    plans.save(output)
    _report_plan(reporter, plans, output, strategy, as_json)


def _report_plan(reporter, plans, output: Path, strategy: str, as_json: bool) -> None:
    """The planner's notes and what was planned, or the JSON summary with --json."""
    from fedseg.cli.console import print_json

    cfg = plans.configuration_for(None)
    for note in plans.extra.get("planning", {}).get("notes", []):
        reporter.log(f"plan: {note}")
    reporter.log(
        f"wrote {output}: {len(plans.sites)} sites, strategy {strategy}, {cfg.name} patch {cfg.patch_size} "
        f"spacing {[round(s, 3) for s in cfg.spacing]} batch {cfg.batch_size}, plan_id {plans.plan_id[:12]}"
    )
    if as_json:
        print_json({"output": str(output), "plan_id": plans.plan_id, "sites": sorted(plans.sites)})


def inspect(
    file: Path = typer.Argument(..., help="A fingerprint, plans.json, weight file, aggregate.json, metrics.json, or a run folder."),
    as_json: bool = JSON,
) -> None:
    """Show what a fedseg file holds (a run folder: where it stands, as `fedseg status`).

    A plans.json shows its configurations and its route table: per pool, its members and model
    file; per site and module, where its tensors go (a pool, or kept at the site).

    Example: fedseg inspect run/round_001/models/global.safetensors
    Example: fedseg inspect run/plans.json
    """
    from fedseg.cli.inspect_view import inspect_file

    inspect_file(file, as_json=as_json)


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
    app.command("fingerprint")(fingerprint)
    app.command("plan")(plan)
    app.command("inspect")(inspect)
