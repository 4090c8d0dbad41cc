"""Trust commands: keygen (one Ed25519 signing pair and one X25519 key-agreement pair per site)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import JSON, QUIET, require_output_dir


def keygen(
    site: str = typer.Option(..., "--site", help="Whose key: a site name of the plan, or 'coordinator'."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for <site>.key (private, mode 0600) and <site>.pub."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Make a site's keys: Ed25519 for signing weight files, X25519 for secure aggregation.

    Both private keys go into <site>.key (stays with its owner), both public keys into
    <site>.pub; send <site>.pub to the coordinator, who lists every public key in the plan
    with `fedseg plan --keys DIR`. Then `train --key`, `init --key` and `aggregate --key` sign
    what they write, and unsigned or wrongly signed files are refused; with
    `--set secure_aggregation=true` the sites mask their updates with keys agreed from the
    X25519 pairs. Never overwrites an existing private key.

    Example: fedseg keygen --site site_a -o keys/
    """
    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.signing import generate_key, load_public_key

    require_output_dir(output, "key folder")
    private_path, public_path = generate_key(site, output)
    signer, public_hex = load_public_key(public_path)
    Reporter(quiet=quiet).log(f"wrote {private_path} (private, keep it at {signer}) and {public_path} (public, send it to the coordinator)")
    if as_json:
        from fedseg.federation.secure_aggregation import load_agreement_key

        print_json({"signer": signer, "private_key": str(private_path), "public_key": str(public_path), "public_hex": public_hex,
                    "agreement_public_hex": load_agreement_key(private_path).public_hex})


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen)
