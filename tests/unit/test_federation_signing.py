"""Signed exchange: keys, detached signatures, and what aggregate / a site refuse."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from test_federation_engine import make_plans, random_state, write_updates

from fedseg.errors import InputError
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.site_update import compose_site_state, write_site_update
from fedseg.federation.signing import (
    COORDINATOR,
    generate_key,
    load_public_keys,
    load_signing_key,
    read_signature,
    sign_weight_file,
    signature_path,
    verify_signature,
    write_signature,
)
from fedseg.federation.weightfile import WeightMeta, read_weight_file, write_weight_file

SITES = ("A", "B", "C")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for signer in (*SITES, COORDINATOR):
        generate_key(signer, folder)
    return folder


def keyed_plans(keydir: Path, **kwargs):
    plans = make_plans(**kwargs)
    plans.keys = load_public_keys(keydir)
    return plans


def key(keydir: Path, signer: str):
    return load_signing_key(keydir / f"{signer}.key")


def signed_updates(plans, keydir: Path, folder: Path) -> dict[str, Path]:
    paths = {}
    for i, site in enumerate(sorted(plans.sites)):
        path = folder / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, random_state(i + 1), path, round_index=1, n_iterations=10, signing_key=key(keydir, site))
        paths[site] = path
    return paths


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    private, public = generate_key("site_a", tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    body = json.loads(public.read_text())
    assert body["signer"] == "site_a" and len(bytes.fromhex(body["public_key"])) == 32
    assert "private_key" not in body
    assert load_signing_key(private).public_hex == body["public_key"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left
    with pytest.raises(InputError, match="refusing to overwrite"):
        generate_key("site_a", tmp_path)
    os.chmod(private, 0o644)
    with pytest.raises(InputError, match="too open"):
        load_signing_key(private)


def test_malformed_key_files_are_input_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.key"
    bad.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    os.chmod(bad, 0o600)
    with pytest.raises(InputError, match="not a fedseg private key"):
        load_signing_key(bad)
    with pytest.raises(InputError, match="no public keys"):
        load_public_keys(tmp_path)


def test_signature_roundtrip_and_every_forgery(keydir: Path, tmp_path: Path) -> None:
    plans = keyed_plans(keydir)
    path = tmp_path / "A.safetensors"
    meta = write_site_update(plans, "A", random_state(1), path, round_index=1, n_iterations=1, signing_key=key(keydir, "A"))
    sig = verify_signature(plans.keys, path, meta.content_hash, "A")
    assert sig.signer == "A" and sig.content_hash == meta.content_hash
    # signing again gives the same bytes (Ed25519 is deterministic): re-running is idempotent
    before = signature_path(path).read_bytes()
    sign_weight_file(path, key(keydir, "A"))
    assert signature_path(path).read_bytes() == before

    # a signature by B over A's file: B's signature is valid, but B is not who the file claims
    write_signature(path, key(keydir, "B"), meta.content_hash, sig.sha256)
    with pytest.raises(InputError, match="signed by 'B' but claims to come from site 'A'"):
        verify_signature(plans.keys, path, meta.content_hash, "A")
    # relabelled signer: B's signature presented as A's
    body = json.loads(signature_path(path).read_text())
    body["signer"] = "A"
    signature_path(path).write_text(json.dumps(body))
    with pytest.raises(InputError, match="does not verify with 'A'"):
        verify_signature(plans.keys, path, meta.content_hash, "A")
    # signature made for other content
    write_signature(path, key(keydir, "A"), "0" * 64, sig.sha256)
    with pytest.raises(InputError, match="other content"):
        verify_signature(plans.keys, path, meta.content_hash, "A")
    # a signer the plan does not know
    stranger = tmp_path / "stranger"
    generate_key("Z", stranger)
    write_signature(path, load_signing_key(stranger / "Z.key"), meta.content_hash, sig.sha256)
    with pytest.raises(InputError, match="no public key in the plan"):
        verify_signature(plans.keys, path, meta.content_hash, "A")
    # garbage and absence
    signature_path(path).write_text("{not json")
    with pytest.raises(InputError, match="malformed"):
        read_signature(path)
    signature_path(path).unlink()
    with pytest.raises(InputError, match="is not signed"):
        verify_signature(plans.keys, path, meta.content_hash, "A")


def test_signed_round_end_to_end(keydir: Path, tmp_path: Path) -> None:
    plans = keyed_plans(keydir)
    paths = signed_updates(plans, keydir, tmp_path)
    out = tmp_path / "round_001"
    with pytest.raises(InputError, match="give --key"):
        aggregate_round(plans, list(paths.values()), out)
    with pytest.raises(InputError, match="key of 'A'"):
        aggregate_round(plans, list(paths.values()), out, signing_key=key(keydir, "A"))
    assert not out.exists()
    report = aggregate_round(plans, list(paths.values()), out, signing_key=key(keydir, COORDINATOR))
    assert report.signed_by == COORDINATOR
    for record in report.outputs:
        file = out / record.path
        _tensors, meta = read_weight_file(file)
        sig = verify_signature(plans.keys, file, meta.content_hash, COORDINATOR, sha256=record.sha256)
        assert sig.signer == COORDINATOR
    first = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # aggregate is idempotent: the same updates give byte-identical files and signatures
    aggregate_round(plans, list(paths.values()), out, signing_key=key(keydir, COORDINATOR))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    # a site loads only coordinator-signed models
    local = {"norm.num_batches_tracked": np.array(3, np.int64)}
    state = compose_site_state(plans, "A", out / "A.safetensors", local)
    assert set(state) == set(random_state(1))
    signature_path(out / "A.safetensors").unlink()
    with pytest.raises(InputError, match="is not signed"):
        compose_site_state(plans, "A", out / "A.safetensors", local)
    # a model signed by a site is not a coordinator model
    write_signature(out / "B.safetensors", key(keydir, "B"), read_weight_file(out / "B.safetensors")[1].content_hash, "x" * 64)
    with pytest.raises(InputError, match="claims to come from the coordinator"):
        compose_site_state(plans, "B", out / "B.safetensors", local)


def test_a_site_cannot_sign_as_another(keydir: Path, tmp_path: Path) -> None:
    plans = keyed_plans(keydir)
    paths = signed_updates(plans, keydir, tmp_path)
    # A writes an update that says it is from B, signed with A's own key
    tensors, meta = read_weight_file(paths["A"])
    fields = {**meta.__dict__, "site": "B", "content_hash": ""}
    forged = tmp_path / "forged.safetensors"
    sign_weight_file_as = write_weight_file(forged, tensors, WeightMeta(**fields))
    sign_weight_file(forged, key(keydir, "A"))
    assert sign_weight_file_as.site == "B"
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        aggregate_round(plans, [paths["A"], forged, paths["C"]], out, signing_key=key(keydir, COORDINATOR))
    assert str(forged) in str(info.value) and "signed by 'A' but claims to come from site 'B'" in str(info.value)
    assert not out.exists()


def test_unsigned_plan_ignores_signatures(tmp_path: Path) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    assert not any(signature_path(p).exists() for p in paths.values())
    report = aggregate_round(plans, list(paths.values()), tmp_path / "round_001")
    assert report.signed_by is None
    assert not list((tmp_path / "round_001").rglob("*.sig"))


def test_signature_covers_the_data(keydir: Path, tmp_path: Path) -> None:
    """A file altered after signing is refused even when its content hash is recomputed."""
    plans = keyed_plans(keydir)
    paths = signed_updates(plans, keydir, tmp_path)
    tensors, meta = read_weight_file(paths["B"])
    tensors = {k: v * np.float32(-10) for k, v in tensors.items()}
    fields = {**meta.__dict__, "content_hash": ""}
    write_weight_file(paths["B"], tensors, WeightMeta(**fields))   # valid hash, old signature
    with pytest.raises(InputError) as info:
        aggregate_round(plans, list(paths.values()), tmp_path / "out", signing_key=key(keydir, COORDINATOR))
    assert str(paths["B"]) in str(info.value) and "altered after signing" in str(info.value)


# -- through the CLI: exit 2, one line naming the file, nothing written -------------------------
def _cli_round(keydir: Path, tmp_path: Path):
    plans = keyed_plans(keydir)
    plans_path = tmp_path / "plans.json"
    plans.save(plans_path)
    return plans, plans_path, signed_updates(plans, keydir, tmp_path)


def _aggregate(plans_path: Path, files, out: Path, keyfile: Path | None) -> int:
    from fedseg.cli.main import run

    args = ["aggregate", "--plans", str(plans_path), *map(str, files), "-o", str(out), "-q"]
    return run(args + (["--key", str(keyfile)] if keyfile else []))


def _one_line(capsys: pytest.CaptureFixture, rc: int, path: Path, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err and fragment in err, err


def _tamper(path: Path) -> None:
    tensors, meta = read_weight_file(path)
    write_weight_file(path, {k: v + np.float32(1) for k, v in tensors.items()}, WeightMeta(**{**meta.__dict__, "content_hash": ""}))


def _flip_byte(path: Path) -> None:   # one tensor byte changed, header and signature untouched
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _unsign(path: Path) -> None:
    signature_path(path).unlink()


def _wrong_signer(keydir: Path):
    def change(path: Path) -> None:
        tensors, meta = read_weight_file(path)
        write_signature(path, key(keydir, "C"), meta.content_hash, json.loads(signature_path(path).read_text())["sha256"])
    return change


def _claims_b(keydir: Path):
    def change(path: Path) -> None:   # path is B's update: replace it by A's weights claiming to be B, signed by A
        tensors, meta = read_weight_file(path)
        write_weight_file(path, tensors, WeightMeta(**{**meta.__dict__, "content_hash": ""}))
        sign_weight_file(path, key(keydir, "A"))
    return change


@pytest.mark.parametrize("case", ["tampered", "flipped byte", "unsigned", "wrong signer", "A claims to be B"])
def test_cli_refuses_bad_signatures(keydir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    _plans, plans_path, paths = _cli_round(keydir, tmp_path)
    change, fragment = {
        "tampered": (_tamper, "altered after signing"),
        # a signed file is hashed once (its bytes against the signed sha256), not by content hash
        "flipped byte": (_flip_byte, "the file bytes differ from the signed ones"),
        "unsigned": (_unsign, "is not signed"),
        "wrong signer": (_wrong_signer(keydir), "signed by 'C' but claims to come from site 'B'"),
        "A claims to be B": (_claims_b(keydir), "signed by 'A' but claims to come from site 'B'"),
    }[case]
    change(paths["B"])
    out = tmp_path / "round_001"
    _one_line(capsys, _aggregate(plans_path, paths.values(), out, keydir / "coordinator.key"), paths["B"], fragment)
    assert not out.exists()


def test_cli_aggregate_needs_the_coordinator_key(keydir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _plans, plans_path, paths = _cli_round(keydir, tmp_path)
    out = tmp_path / "round_001"
    from fedseg.cli.main import run

    rc = _aggregate(plans_path, paths.values(), out, None)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "give --key" in err and len(err.splitlines()) == 1
    _one_line(capsys, _aggregate(plans_path, paths.values(), out, keydir / "A.key"), keydir / "A.key", "key of 'A'")
    assert not out.exists()
    assert _aggregate(plans_path, paths.values(), out, keydir / "coordinator.key") == 0
    assert sorted(p.name for p in out.glob("*.sig")) == ["A.safetensors.sig", "B.safetensors.sig", "C.safetensors.sig"]
    assert (out / "models" / "global.safetensors.sig").is_file()
    # keygen via the CLI, and a key the plan does not list is refused by train before any work
    assert run(["keygen", "--site", "A", "-o", str(tmp_path / "other"), "-q"]) == 0
    rc = run(["train", "--site", "A", "--data", str(tmp_path), "--plans", str(plans_path), "--weights", str(out / "A.safetensors"),
              "--state", str(tmp_path / "state"), "-o", str(tmp_path / "u.safetensors"), "--key", str(tmp_path / "other" / "A.key"), "-q"])
    _one_line(capsys, rc, tmp_path / "other" / "A.key", "does not match the plan's public key for 'A'")
    assert not (tmp_path / "state").exists()


def test_cli_plan_with_keys(keydir: Path, tmp_path: Path, tiny_sites: Path, capsys: pytest.CaptureFixture) -> None:
    from fedseg.cli.main import run
    from fedseg.data.dataset import load_dataset
    from fedseg.planning.fingerprint import compute_fingerprint, save_fingerprint
    from fedseg.planning.plans import load_plans

    fps = []
    names = sorted(p.name for p in tiny_sites.iterdir() if p.is_dir())
    for name in names:
        fps.append(tmp_path / f"{name}.json")
        save_fingerprint(compute_fingerprint(load_dataset(tiny_sites / name), name), fps[-1])
    keys = tmp_path / "pub"
    for signer in (*names, COORDINATOR):
        generate_key(signer, tmp_path / "priv")
        keys.mkdir(exist_ok=True)
        (keys / f"{signer}.pub").write_bytes((tmp_path / "priv" / f"{signer}.pub").read_bytes())
    assert run(["plan", *map(str, fps), "-o", str(tmp_path / "plans.json"), "--keys", str(keys), "-q"]) == 0
    plans = load_plans(tmp_path / "plans.json")
    assert set(plans.keys) == {*names, COORDINATOR}
    assert plans.keys[names[0]] == load_signing_key(tmp_path / "priv" / f"{names[0]}.key").public_hex
    # a site without a key: refused, nothing written
    (keys / f"{names[1]}.pub").unlink()
    rc = run(["plan", *map(str, fps), "-o", str(tmp_path / "p2.json"), "--keys", str(keys), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"no public key for {names[1]}" in err and not (tmp_path / "p2.json").exists()
