"""Record tests/golden/tensors.json: one tiny round of every strategy (see tests/golden/golden_runs.py).

Run from the repository root after an intended numeric change, and name the change in the commit:

    PYTHONPATH=$PWD python scripts/record_golden.py [--check]

--check compares with the record instead of writing it (what tests/golden/test_golden.py does).
--machine records (or checks) the file of this kind of machine, tensors-<machine>.json: the last
bits of trained tensors depend on the CPU, so a refactoring is checked bit for bit against a
record made on the same kind of machine, on the commit before the change. After an intended
numeric change, re-record the main file and delete the other machines' files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "golden"))

from golden_runs import (  # noqa: E402
    GOLDEN_FILE,
    golden_digests,
    identities,
    load_golden,
    machine_file,
    machine_signature,
    save_golden,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the record instead of writing it")
    parser.add_argument("--output", type=Path, default=GOLDEN_FILE, help="where to write the record (default: %(default)s)")
    parser.add_argument("--machine", action="store_true",
                        help="record (or check) this kind of machine's own file, tensors-<machine>.json, beside the main record")
    args = parser.parse_args()
    if args.machine:
        args.output = machine_file(machine_signature())
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        digests = golden_digests(Path(tmp))
    seconds = time.monotonic() - start
    if args.check:
        same = identities(digests) == identities(load_golden(args.output))
        print(f"{'same' if same else 'DIFFERENT'} tensors as {args.output} ({seconds:.1f}s)")
        return 0 if same else 1
    save_golden(digests, args.output)
    n = sum(len(tensors) for files in digests.values() for tensors in files.values())
    print(f"wrote {args.output}: {len(digests)} strategies, {n} tensors ({seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
