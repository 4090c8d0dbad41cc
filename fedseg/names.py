"""Site names, and the paths built from them.

A site name travels between institutions (in fingerprints, plans.json, weight files, key
files) and becomes part of file names at the coordinator and at every site
(`round_r/<site>.safetensors`, `fingerprints/<site>.json`, `state/<site>/`, `<site>.key`).
A name written by someone else must therefore never be able to leave the folder it is used
in: `../../x` would write outside the run folder, `a/b` would make sub-folders, a
300-character name fails half-way through a round on file systems that cap name length.

One rule for every site name, checked by the first command that sees one: 1 to 64
characters from letters, digits, `.`, `_` and `-`, starting with a letter or digit, and no
`..` anywhere. Every path built from a name also goes through `path_inside`, which checks the
result (symbolic links resolved) stays inside its folder, so a name that slipped past the
rule still cannot escape.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedseg.errors import InputError

# 64 characters: far below every file system's 255-byte name limit, with room for the
# suffixes fedseg adds (".safetensors.sig", ".fingerprint.json", temporary-file prefixes).
SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SITE_NAME_RULE = "1-64 characters from letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'"


def is_site_name(name: object) -> bool:
    return isinstance(name, str) and SITE_NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def check_site_name(name: object, source: str | Path | None = None, what: str = "site name") -> str:
    """`name` if it follows the site-name rule; InputError naming `source` (the file it came from) otherwise."""
    if not is_site_name(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + f"… ({len(name)} characters)"
        raise InputError(f"{what} {shown} is not allowed ({SITE_NAME_RULE})", source)
    return name  # type: ignore[return-value]


def path_inside(folder: str | Path, *parts: str) -> Path:
    """`folder / parts…`, refused unless the result (links resolved) lies inside `folder`."""
    folder = Path(folder)
    path = folder.joinpath(*parts)
    base = folder.resolve()
    resolved = path.resolve()
    if resolved == base or base not in resolved.parents:
        raise InputError(f"{'/'.join(parts)!r} would lead outside this folder", folder)
    return path
