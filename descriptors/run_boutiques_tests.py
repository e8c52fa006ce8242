#!/usr/bin/env python3
"""Runs the `tests` of the Boutiques descriptor with `bosh exec launch --no-container` (chimap on
PATH), from the repository root, and checks their assertions.

`bosh test` would do the same inside the container image, which is not published. Beyond the
assertions (exit code, fixed output paths), a successful run that is not a dry run must have
produced every per-acquisition output the descriptor lists (its glob templates), except the
sessions variant (bids/example has no sessions), the group level's, and MEDI's CSF mask (the
tests run the default method).
"""

import json
import sys
import tempfile
from pathlib import Path

import boutiques

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "descriptors" / "chimap.boutiques.json"
NOT_IN_EXAMPLE = {"chimap_sessions", "group_qc", "group_report", "csf_mask"}


def main():
    desc = json.loads(DESCRIPTOR.read_text())
    failures = []
    for test in desc["tests"]:
        name, assertions = test["name"], test["assertions"]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(test["invocation"], f)
        result = boutiques.execute(
            "launch", str(DESCRIPTOR), f.name, "--no-container", "--skip-data-collection"
        )
        Path(f.name).unlink()
        found = {o.boutiques_name for o in result.output_files}
        problems = []
        if result.exit_code != assertions.get("exit-code", 0):
            problems.append(f"exit code {result.exit_code}, expected {assertions.get('exit-code', 0)}")
        for out in assertions.get("output-files", []):
            if out["id"] not in found:
                problems.append(f"output {out['id']} missing")
        if result.exit_code == 0 and not test["invocation"].get("dry_run"):
            expected = {o["id"] for o in desc["output-files"]} - NOT_IN_EXAMPLE
            for missing in sorted(expected - found):
                problems.append(f"output {missing} not produced")
        status = "ok" if not problems else "FAILED"
        print(f"{status}: {name}: {result.shell_command.strip()} -> exit {result.exit_code}")
        for p in problems:
            print(f"    {p}")
        if problems:
            print(result.stderr[-2000:])
            failures.append(name)
    if failures:
        sys.exit(f"run_boutiques_tests.py: {len(failures)} test(s) failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
