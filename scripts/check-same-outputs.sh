#!/usr/bin/env bash
# Prove that two expo builds write the same outputs (issue 21, "no behaviour change").
#
#   scripts/check-same-outputs.sh OLD_EXPO NEW_EXPO [WORKDIR]
#
# Runs a fixed set of expo commands with each binary, from the repository root, into
# WORKDIR/old and WORKDIR/new (WORKDIR defaults to a new mktemp directory, kept afterwards),
# writes the sha256 of every file of every output (paths relative to WORKDIR/old or /new) to
# WORKDIR/old.sha256 and WORKDIR/new.sha256, and compares them.
# Exit 0 and "identical: N files in M runs" when they match; else the differing files, exit 1.
# Exit 2 on a usage error.
#
# The runs (every extrapolate with --json, its stdout kept as RUN.stdout.json):
#   tiny/a0.3                 extrapolate examples/tiny-sft -> examples/tiny-dpo, --alpha 0.3
#   tiny/sweep-{alpha}        the same, --alpha 0.1,0.3,2.5 --skip embed --alpha-for self_attn=x0.5
#   tiny/diff, tiny/inspect-* diff --json of the pair, inspect --json of each side (stdout)
#   peft/CASE/{model,adapter}-{0.3,1.5}
#                             extrapolate --sft CASE/base --aligned CASE/adapter --as model|adapter,
#                             for every CASE in tests/fixtures/peft-real/
#   peft/CASE/diff, peft/CASE/inspect
#                             diff --json base vs adapter, inspect --json of the adapter (stdout)
#   exit-codes.txt            every run's exit status (part of the manifest)
#
# Normalised before hashing (everything else is compared byte for byte), because these differ
# between builds or between directories and say nothing about behaviour:
#   - in expo.json, the model card README.md written beside it, and the captured JSON stdout:
#     the binary's path (command[0] / first word of the card's command line) -> <EXPO>,
#     WORKDIR/old/ and WORKDIR/new/ -> <OUT>/, the repository root/ -> <REPO>/;
#   - expo.json's top-level "version" value -> "<VERSION>", the card's "Made with expo X:" line;
#   - in captured JSON stdout, the value of "seconds" (wall-clock time) -> "<SECONDS>".
# The normalised copies of those files are kept in WORKDIR/norm-{old,new}/ for diffing.
# Needs python3 (developer script, not CI).
set -euo pipefail

usage() {
    echo "usage: $0 OLD_EXPO NEW_EXPO [WORKDIR]" >&2
    exit 2
}
[[ $# -eq 2 || $# -eq 3 ]] || usage

resolve_bin() {
    local p
    p=$(command -v -- "$1" 2>/dev/null) || { echo "error: $1 is not an executable" >&2; exit 2; }
    [[ -f $p && -x $p ]] || { echo "error: $1 is not an executable file" >&2; exit 2; }
    realpath -- "$p"
}
OLD=$(resolve_bin "$1")
NEW=$(resolve_bin "$2")
command -v python3 >/dev/null || { echo "error: python3 is needed" >&2; exit 2; }

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
if [[ $# -eq 3 ]]; then
    mkdir -p -- "$3"
    WORKDIR=$(cd -- "$3" && pwd -P)
else
    WORKDIR=$(cd -- "$(mktemp -d "${TMPDIR:-/tmp}/expo-same-outputs.XXXXXX")" && pwd -P)
fi
# Output paths appear shell-quoted in the model card; keep them free of characters that
# would be quoted, so that a plain textual replacement normalises them.
if [[ ! $WORKDIR =~ ^[A-Za-z0-9._/+-]+$ ]]; then
    echo "error: WORKDIR $WORKDIR: use only letters, digits and . _ / + -" >&2
    exit 2
fi
for side in old new; do
    for p in "$WORKDIR/$side" "$WORKDIR/$side.sha256" "$WORKDIR/norm-$side" "$WORKDIR/bin-$side" "$WORKDIR/logs-$side"; do
        if [[ -e $p ]]; then
            echo "error: $p exists; give an empty or new WORKDIR" >&2
            exit 2
        fi
    done
done

cd "$REPO"
shopt -s nullglob
PEFT_CASES=()
for d in tests/fixtures/peft-real/*/; do
    d=${d%/}
    [[ -d $d/base && -f $d/adapter/adapter_config.json ]] && PEFT_CASES+=("$d")
done
shopt -u nullglob
[[ ${#PEFT_CASES[@]} -gt 0 ]] || { echo "error: no fixtures under $REPO/tests/fixtures/peft-real/" >&2; exit 2; }

RUNS=0
# run SIDE NAME STDOUT_FILE ARGS...: run expo, record its exit status, keep stderr in logs.
run() {
    local side=$1 name=$2 out=$3 rc=0
    shift 3
    local bin="$WORKDIR/bin-$side/expo" log="$WORKDIR/logs-$side/${name//\//_}.stderr"
    mkdir -p -- "$(dirname -- "$out")"
    "$bin" "$@" >"$out" 2>"$log" || rc=$?
    printf '%s %d\n' "$name" "$rc" >>"$WORKDIR/$side/exit-codes.txt"
    if [[ $rc -ne 0 ]]; then
        echo "warning: $side: run $name exited $rc (stderr in $log)" >&2
    fi
    RUNS=$((RUNS + 1))
}

run_all() {
    local side=$1 o="$WORKDIR/$1" c n as a
    mkdir -p -- "$o/tiny" "$WORKDIR/logs-$side" "$WORKDIR/bin-$side"
    # Invoke every build through the same kind of path (WORKDIR/bin-SIDE/expo), so that the
    # recorded command line differs only by that prefix.
    ln -s -- "$( [[ $side == old ]] && echo "$OLD" || echo "$NEW")" "$WORKDIR/bin-$side/expo"
    : >"$o/exit-codes.txt"

    local pair=(--sft examples/tiny-sft --aligned examples/tiny-dpo)
    run "$side" tiny/a0.3 "$o/tiny/a0.3.stdout.json" \
        extrapolate "${pair[@]}" --alpha 0.3 --output "$o/tiny/a0.3" --json
    run "$side" tiny/sweep "$o/tiny/sweep.stdout.json" \
        extrapolate "${pair[@]}" --alpha 0.1,0.3,2.5 --output "$o/tiny/sweep-{alpha}" \
        --skip embed --alpha-for 'self_attn=x0.5' --json
    run "$side" tiny/diff "$o/tiny/diff.stdout.json" diff "${pair[@]}" --json
    run "$side" tiny/inspect-sft "$o/tiny/inspect-sft.stdout.json" inspect examples/tiny-sft --json
    run "$side" tiny/inspect-dpo "$o/tiny/inspect-dpo.stdout.json" inspect examples/tiny-dpo --json

    for c in "${PEFT_CASES[@]}"; do
        n="peft/$(basename -- "$c")"
        mkdir -p -- "$o/$n"
        for as in model adapter; do
            for a in 0.3 1.5; do
                run "$side" "$n/$as-$a" "$o/$n/$as-$a.stdout.json" \
                    extrapolate --sft "$c/base" --aligned "$c/adapter" --alpha "$a" --as "$as" \
                    --output "$o/$n/$as-$a" --json
            done
        done
        run "$side" "$n/diff" "$o/$n/diff.stdout.json" diff --sft "$c/base" --aligned "$c/adapter" --json
        run "$side" "$n/inspect" "$o/$n/inspect.stdout.json" inspect "$c/adapter" --json
    done
}

# manifest SIDE: sha256 of every file under WORKDIR/SIDE (normalised where documented above).
manifest() {
    python3 - "$WORKDIR" "$1" "$REPO" <<'PY'
import hashlib, os, re, sys

workdir, side, repo = sys.argv[1:4]
root = os.path.join(workdir, side)
norm_root = os.path.join(workdir, "norm-" + side)
replacements = [
    (os.path.join(workdir, "bin-" + side, "expo"), "<EXPO>"),
    (root + "/", "<OUT>/"),
    (repo + "/", "<REPO>/"),
]

def paths(text):
    for old, new in replacements:
        text = text.replace(old, new)
    return text

def normalise(rel, data):
    base = os.path.basename(rel)
    beside_expo_json = os.path.isfile(os.path.join(root, os.path.dirname(rel), "expo.json"))
    if base.endswith(".stdout.json"):
        text = paths(data.decode("utf-8"))
        text = re.sub(r'("seconds": )-?[0-9][0-9.eE+-]*', r'\1"<SECONDS>"', text)
    elif base == "expo.json":
        text = paths(data.decode("utf-8"))
        text = re.sub(r'^(  "version": )"[^"\n]*"', r'\1"<VERSION>"', text, flags=re.M)
    elif base == "README.md" and beside_expo_json:  # the model card expo writes
        text = paths(data.decode("utf-8"))
        text = re.sub(r"^Made with expo [^\s:]+:$", "Made with expo <VERSION>:", text, flags=re.M)
    else:
        return data, False
    return text.encode("utf-8"), True

lines = []
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in filenames:
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)
        with open(path, "rb") as fh:
            data = fh.read()
        data, changed = normalise(rel, data)
        if changed:
            dest = os.path.join(norm_root, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as fh:
                fh.write(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {rel}\n")
lines.sort(key=lambda l: l.split("  ", 1)[1].encode())
with open(os.path.join(workdir, side + ".sha256"), "w") as fh:
    fh.writelines(lines)
PY
}

start=$(date +%s.%N)
RUNS=0
run_all old
runs_old=$RUNS
RUNS=0
run_all new
manifest old
manifest new
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")

python3 - "$WORKDIR" "$runs_old" "$elapsed" <<'PY'
import os, subprocess, sys

workdir, runs, elapsed = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def load(side):
    out = {}
    with open(os.path.join(workdir, side + ".sha256")) as fh:
        for line in fh:
            h, rel = line.rstrip("\n").split("  ", 1)
            out[rel] = h
    return out

old, new = load("old"), load("new")
only_old = sorted(set(old) - set(new))
only_new = sorted(set(new) - set(old))
differ = sorted(r for r in set(old) & set(new) if old[r] != new[r])
failed = []
for side in ("old", "new"):
    with open(os.path.join(workdir, side, "exit-codes.txt")) as fh:
        failed += [f"{side}: {l.strip()}" for l in fh if not l.strip().endswith(" 0")]

if not (only_old or only_new or differ or failed):
    print(f"identical: {len(old)} files in {runs} runs ({elapsed}s; {workdir})")
    sys.exit(0)

for rel in only_old:
    print(f"only in old: {rel}")
for rel in only_new:
    print(f"only in new: {rel}")
for rel in differ:
    print(f"differs: {rel}")
# Show what changed in the (small) text files, normalised as compared.
shown = 0
for rel in differ:
    if shown >= 5 or not rel.endswith((".json", ".md", ".txt")):
        continue
    a, b = (os.path.join(workdir, f"norm-{s}", rel) for s in ("old", "new"))
    if not os.path.exists(a):
        a, b = (os.path.join(workdir, s, rel) for s in ("old", "new"))
    diff = subprocess.run(["diff", "-u", "--label", f"old/{rel}", "--label", f"new/{rel}", a, b],
                          capture_output=True, text=True).stdout.splitlines()
    print("\n".join(diff[:30] + (["..."] if len(diff) > 30 else [])))
    shown += 1
for f in failed:
    print(f"run failed: {f}")
print(f"NOT identical: {len(differ)} differ, {len(only_old)} only in old, {len(only_new)} only in new, "
      f"{len(failed)} failed runs; of {len(old)} files in {runs} runs ({elapsed}s; {workdir})")
sys.exit(1)
PY
