#!/usr/bin/env bash
# Array jobs on one OUTPUT_DIR, a kill -9, and a rerun (issue 21).
#
# Starts 4 participant runs of bids/example at once into one folder (subject 1, subject 2,
# both, and subject 1 again: two runs on the same acquisitions), SIGKILLs one of them at a
# random moment, checks that every file under a final name is complete, reruns all four
# (no --overwrite); then kills a lone run at a random moment and reruns it; and checks that
#   - every run of the rerun exits 0 and the rerun recomputes only what was missing,
#   - every Chimap equals a clean single run's bit for bit, and the same files exist,
#   - no temporary (.partial-) or lock file is left, in OUTPUT_DIR or in the --work-dir
#     the runs share (its local-field checkpoints are consumed by the rerun),
#   - the BIDS validator (when installed by descriptors/check.sh) reports no error, and
#     exactly what it reports on the clean run.
# ROUNDS (default 3) repeats the kill and rerun with new random moments; SEED fixes them.
# Usage: bash tests/concurrency.sh [path/to/chimap]   (builds the release binary if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-$$}
RANDOM=$SEED
echo "concurrency check: $ROUNDS round(s), SEED=$SEED"

BIN=${1:-}
if [ -z "$BIN" ]; then
    cargo build --release --quiet
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/chimap
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/chimap-concurrency.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# What each of the 4 concurrent runs selects.
SELECT=("--participant-label 1" "--participant-label 2" "" "--participant-label sub-1")

"$BIN" bids/example "$WORK/clean" participant -q --nthreads 1 || fail "the clean run failed"

# Every file under a final name is whole: gzip streams check, JSON parses.
check_complete() {
    local bad=0
    while IFS= read -r -d '' f; do
        case "$f" in
            *.nii.gz) gzip -t "$f" 2>/dev/null || { echo "incomplete: $f" >&2; bad=1; } ;;
            *.json) jq empty "$f" 2>/dev/null || { echo "incomplete: $f" >&2; bad=1; } ;;
        esac
    done < <(find "$1" -type f ! -name '.*' -print0)
    [ $bad -eq 0 ] || fail "incomplete files under final names"
}

listing() { (cd "$1" && find . -type f ! -name '*.html' ! -path '*/figures/*' | sort); }

# Chimaps of the clean run that OUTPUT_DIR $1 lacks (a Chimap counts once its sidecar exists).
count_missing() {
    local missing=0
    for c in $(cd "$WORK/clean" && find . -name '*_Chimap.nii.gz'); do
        [ -f "$1/${c%.nii.gz}.json" ] || missing=$((missing + 1))
    done
    echo $missing
}

# Acquisitions computed by the runs whose logs are given, from their JSON summary records.
count_processed() {
    cat "$@" | jq -R 'fromjson? | select(.event == "summary") | .processed | length' |
        paste -sd+ | bc
}

# The end state: like a clean run, nothing temporary left.
verify() {
    check_complete "$1"
    left=$(find "$1" -name '*.partial-*' -o -name '*.lock')
    [ -z "$left" ] || fail "left behind: $left"
    diff <(listing "$WORK/clean") <(listing "$1") || fail "the files differ from the clean run's"
    for c in $(cd "$WORK/clean" && find . -name '*_Chimap.nii.gz'); do
        cmp -s "$WORK/clean/$c" "$1/$c" || fail "$c differs from the clean run's"
    done
    echo "   every Chimap equals the clean run's; no temporary or lock file left"
}

# The work folder $1 is empty once every acquisition is done; say how many acquisitions the
# runs whose logs follow resumed from it.
verify_scratch() {
    local dir=$1
    shift
    left=$(find "$dir" -type f 2>/dev/null)
    [ -z "$left" ] || fail "left in the work folder: $left"
    resumed=$(cat "$@" | grep -c 'taken from --work-dir' || true)
    echo "   work folder empty; $resumed acquisition(s) resumed from it"
}

sleep_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }

for round in $(seq 1 "$ROUNDS"); do
    OUT=$WORK/shared-$round
    victim=$((RANDOM % 4))
    delay_ms=$((RANDOM % 2500))
    echo "-- round $round: 4 concurrent runs, run $victim gets SIGKILL after $delay_ms ms"
    pids=()
    for i in 0 1 2 3; do
        # shellcheck disable=SC2086
        "$BIN" bids/example "$OUT" participant --nthreads 1 --log-format json ${SELECT[$i]} \
            --work-dir "$WORK/scratch-$round" > "$WORK/r$round-$i.log" 2>&1 &
        pids+=($!)
    done
    sleep_ms $delay_ms
    kill -9 "${pids[$victim]}" 2>/dev/null || echo "   (run $victim had already finished)"
    for i in 0 1 2 3; do
        rc=0
        wait "${pids[$i]}" 2>/dev/null || rc=$?
        if [ "$i" -ne "$victim" ] && [ "$rc" -ne 0 ]; then
            cat "$WORK/r$round-$i.log" >&2
            fail "run $i exited $rc"
        fi
    done
    check_complete "$OUT"
    missing=$(count_missing "$OUT")
    echo "   after the kill: $missing Chimap(s) missing"

    # The rerun: the same four runs, none killed.
    pids=()
    for i in 0 1 2 3; do
        # shellcheck disable=SC2086
        "$BIN" bids/example "$OUT" participant --nthreads 1 --log-format json ${SELECT[$i]} \
            --work-dir "$WORK/scratch-$round" > "$WORK/re$round-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in 0 1 2 3; do
        wait "${pids[$i]}" || { cat "$WORK/re$round-$i.log" >&2; fail "rerun $i failed"; }
    done
    # Each acquisition that was missing is computed by exactly one run of the rerun.
    processed=$(count_processed "$WORK"/re"$round"-*.log)
    [ "$processed" -eq "$missing" ] || fail "the rerun computed $processed acquisitions, $missing were missing"
    echo "   the rerun computed $processed"
    verify "$OUT"
    verify_scratch "$WORK/scratch-$round" "$WORK"/re"$round"-*.log

    # The other runs above finish a killed run's work; here a lone run is killed mid-way.
    SOLO=$WORK/solo-$round
    delay_ms=$((RANDOM % 3500))
    echo "-- round $round: a lone run gets SIGKILL after $delay_ms ms"
    "$BIN" bids/example "$SOLO" participant --nthreads 1 -q --work-dir "$WORK/scratch-solo-$round" &
    pid=$!
    sleep_ms $delay_ms
    kill -9 $pid 2>/dev/null || echo "   (it had already finished)"
    wait $pid 2>/dev/null || true
    [ -d "$SOLO" ] && check_complete "$SOLO"
    missing=$(count_missing "$SOLO")
    stale=$(find "$WORK/solo-$round" -name '*.partial-*' 2>/dev/null | wc -l)
    echo "   after the kill: $missing Chimap(s) missing, $stale temporary file(s)"
    "$BIN" bids/example "$SOLO" participant --nthreads 1 --log-format json \
        --work-dir "$WORK/scratch-solo-$round" > "$WORK/solo$round.log" 2>&1 ||
        { cat "$WORK/solo$round.log" >&2; fail "the rerun after the lone kill failed"; }
    processed=$(count_processed "$WORK/solo$round.log")
    [ "$processed" -eq "$missing" ] || fail "the rerun computed $processed acquisitions, $missing were missing"
    echo "   the rerun computed $processed"
    verify "$SOLO"
    verify_scratch "$WORK/scratch-solo-$round" "$WORK/solo$round.log"
done

VALIDATOR=${CHIMAP_TOOLS:-$HOME/.cache/chimap-tools}/venv/bin/bids-validator-deno
if [ -x "$VALIDATOR" ]; then
    issues() {
        "$VALIDATOR" "$1" --format json 2>/dev/null |
            jq -r '.issues.issues[] | "\(.severity) \(.code) \(.location // "")"' | sort
    }
    diff <(issues "$WORK/clean") <(issues "$WORK/shared-$ROUNDS") ||
        fail "the validator reports something on the shared output that it does not on a clean run"
    errors=$(issues "$WORK/shared-$ROUNDS" | grep -c '^error' || true)
    [ "$errors" -eq 0 ] || { issues "$WORK/shared-$ROUNDS" >&2; fail "the validator reports $errors error(s)"; }
    echo "-- BIDS validator: no error, and the same report as on a clean run"
else
    echo "-- BIDS validator not installed ($VALIDATOR; descriptors/check.sh installs it): skipped"
fi
echo "concurrency check passed"
