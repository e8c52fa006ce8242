#!/usr/bin/env bash
# Integration checks of chimap as a workflow node, on bids/example, with the real tools:
#   Boutiques (bosh validate, the descriptor's tests via bosh exec launch without a container),
#   Snakemake (local executor, 2 cores; dry runs of the group gate and the SLURM profile),
#   the Nextflow module (rendered and run without Nextflow, which cannot be installed here),
#   pybids on the Snakemake output, the group level and the HTML reports rendered in headless
#   Chromium (descriptors/check_report.sh, which installs Debian's chromium as root), and the
#   BIDS validator (schema-based from PyPI, and the npm bids-validator) on bids/example.
# Needs python3 (3.11), node and npm (20), PyPI and npm reachable; builds chimap if needed.
# Tools are installed once into $CHIMAP_TOOLS (default ~/.cache/chimap-tools) and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

TOOLS=${CHIMAP_TOOLS:-$HOME/.cache/chimap-tools}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/chimap-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

step() { echo; echo "== $*"; STEP_START=$SECONDS; }
took() { echo "   ($((SECONDS - STEP_START)) s)"; }

step "chimap binary"
cargo build --release --bin chimap
# CARGO_TARGET_DIR moves the build output (CI caches often set it).
export PATH="${CARGO_TARGET_DIR:-$REPO/target}/release:$PATH"
chimap --version
took

step "tools into $TOOLS"
mkdir -p "$TOOLS"
REQ_HASH=$(sha256sum descriptors/requirements.txt | cut -c1-16)
if [ ! -f "$TOOLS/venv/.installed-$REQ_HASH" ]; then
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check -r descriptors/requirements.txt
    touch "$TOOLS/venv/.installed-$REQ_HASH"
fi
NPM_VALIDATOR=bids-validator@1.15.0
if [ ! -f "$TOOLS/npm/.installed-$NPM_VALIDATOR" ]; then
    rm -rf "$TOOLS/npm" && mkdir -p "$TOOLS/npm"
    (cd "$TOOLS/npm" && npm install --silent --no-audit --no-fund --no-save "$NPM_VALIDATOR")
    touch "$TOOLS/npm/.installed-$NPM_VALIDATOR"
fi
VENV=$TOOLS/venv/bin
"$VENV/python" --version
"$VENV/pip" list --disable-pip-version-check 2>/dev/null |
    grep -Ei '^(boutiques|pybids|pytest|snakemake|bids-validator-deno) '
took

step "Boutiques: bosh validate"
"$VENV/bosh" validate descriptors/chimap.boutiques.json
took

step "Boutiques: the descriptor's tests with bosh exec launch --no-container"
PATH="$VENV:$PATH" "$VENV/python" descriptors/run_boutiques_tests.py
took

step "Snakemake: one job per participant of bids/example, local executor, 2 cores"
SMK=(-s "$REPO/descriptors/snakemake/Snakefile" --configfile "$REPO/descriptors/snakemake/config.yaml"
     --directory "$WORK" --config "bids_dir=$REPO/bids/example" "output_dir=$WORK/snakemake/chimap")
"$VENV/snakemake" "${SMK[@]}" --cores 2 --quiet rules
SUMMARY=$WORK/snakemake/chimap/logs/chimap_summary.tsv
cat "$SUMMARY"
# One Chimap per raw acquisition (phase series of echo 1), all in ppm.
EXPECTED=$(find bids/example -path '*/derivatives' -prune -o -name '*_echo-1_part-phase_MEGRE.nii.gz' -print | wc -l)
test "$(tail -n +2 "$SUMMARY" | grep -c $'\tppm$')" -eq "$EXPECTED"
took

step "Snakemake: dry runs of the group gate and the SLURM profile"
"$VENV/snakemake" "${SMK[@]}" --cores 2 --dry-run --config group_level=true \
    "bids_dir=$REPO/bids/example" "output_dir=$WORK/snakemake/gated" > "$WORK/gated.txt" 2>&1
grep -Eq '^group +1$' "$WORK/gated.txt"
"$VENV/snakemake" "${SMK[@]}" --profile "$REPO/descriptors/snakemake/profiles/slurm" --dry-run \
    --config "bids_dir=$REPO/bids/example" "output_dir=$WORK/snakemake/slurm" > "$WORK/slurm.txt" 2>&1
grep -Eq '^participant +2$' "$WORK/slurm.txt"
echo "group job appears with group_level=true; the SLURM profile plans 2 participant jobs"
took

step "Nextflow module: rendered command lines against the descriptor, task and stub run with bash"
PATH="$VENV:$PATH" python3 descriptors/nextflow/check_module.py --run
took

step "pybids reads the Snakemake output as a derivative dataset"
CHIMAP_OUTPUT_DIR=$WORK/snakemake/chimap "$VENV/pytest" -q -p no:cacheprovider tests/python
took

step "Reports: group level on the Snakemake output, then headless Chromium loads every image"
chimap bids/example "$WORK/snakemake/chimap" group
bash descriptors/check_report.sh "$WORK/snakemake/chimap" sub-1.html sub-2.html group.html
took

step "BIDS validator (schema-based, bids-validator-deno) on bids/example: no errors"
"$VENV/bids-validator-deno" --version
"$VENV/bids-validator-deno" bids/example --format json > "$WORK/validator.json" || true
"$VENV/python" - "$WORK/validator.json" <<'PY'
import collections, json, sys
issues = json.load(open(sys.argv[1]))["issues"]["issues"]
errors = [i for i in issues if i["severity"] == "error"]
for i in errors:
    print("error:", i["code"], i.get("subCode") or "", i.get("location") or "")
print("warnings:", dict(collections.Counter(i["code"] for i in issues if i["severity"] == "warning")))
sys.exit(f"{len(errors)} validator error(s)" if errors else 0)
PY
took

step "BIDS validator (npm $NPM_VALIDATOR) on bids/example: no errors"
"$TOOLS/npm/node_modules/.bin/bids-validator" --json bids/example > "$WORK/validator-npm.json" 2>/dev/null || true
"$VENV/python" - "$WORK/validator-npm.json" <<'PY'
import json, sys
issues = json.load(open(sys.argv[1]))["issues"]
for e in issues["errors"]:
    print("error:", e["key"], e.get("reason", ""))
print("warnings:", [w["key"] for w in issues["warnings"]])
sys.exit(f"{len(issues['errors'])} validator error(s)" if issues["errors"] else 0)
PY
took

echo
echo "descriptors/check.sh: all integration checks passed in $SECONDS s"
