#!/usr/bin/env bash
# `expo search --slurm` against a real single-node Slurm (../shared/slurm style: a private
# cluster on 127.0.0.1 with 4 fake GPUs). Uses the cluster of $SLURM_CONF when one answers,
# else starts one with SLURM_SETUP_DIR/setup-slurm.sh (default: ../shared/slurm). After each
# search: `squeue` holds no job. Exit 0 with one "skipped" line when Slurm's packages cannot
# be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SETUP=${SLURM_SETUP_DIR:-$ROOT/../shared/slurm}

if [ -n "${SLURM_CONF:-}" ] && sinfo -h >/dev/null 2>&1; then
  echo "check-slurm: using the running cluster of $SLURM_CONF"
else
  if [ ! -f "$SETUP/setup-slurm.sh" ]; then
    echo "check-slurm: skipped: no running cluster and no $SETUP/setup-slurm.sh"
    exit 0
  fi
  CL=$(mktemp -d)
  bash "$SETUP/setup-slurm.sh" "$CL"
  rc=$?
  if [ $rc = 3 ]; then
    echo "check-slurm: skipped: slurm-wlm and munge could not be installed"
    exit 0
  elif [ $rc != 0 ]; then
    echo "check-slurm: FAILED: the test cluster did not start"
    exit 1
  fi
  trap 'bash "$SETUP/stop-slurm.sh" "$CL" >/dev/null 2>&1; rm -rf "$CL"' EXIT
  # shellcheck disable=SC1091
  source "$CL/env.sh"
fi
NODE=${SLURM_TEST_NODE:-$(sinfo -h -o %n | head -1)}

cargo build --locked -q || exit 1
EXPO=$ROOT/target/debug/expo
W=$(mktemp -d)
trap_w() { rm -rf "$W"; }
FAILED=0
fail() { echo "check-slurm: FAIL: $*"; FAILED=1; }
ok() { echo "check-slurm: ok: $*"; }

queue_empty() {
  local n
  for _ in $(seq 1 30); do
    n=$(squeue -h | wc -l)
    [ "$n" = 0 ] && { echo "  squeue: empty"; return 0; }
    sleep 1
  done
  squeue; fail "squeue still holds jobs after $1"; scancel --user="$(id -un)" 2>/dev/null; return 1
}

# Score −(α − 0.3)²; EVAL_SLEEP seconds first; α = $HANG_AT sleeps forever (a trap notes TERM).
cat > "$W/eval.sh" <<'EOS'
#!/bin/sh
echo "alpha=$EXPO_ALPHA gpu=$CUDA_VISIBLE_DEVICES job=$SLURM_JOB_ID" >&2
if [ "$EXPO_ALPHA" = "${HANG_AT:-none}" ]; then
  trap 'echo "TERM at $(date +%s)" >> "$EXPO_WORKDIR/termed"; exit 143' TERM
  while :; do sleep 0.2; done
fi
sleep "${EVAL_SLEEP:-1}"
awk -v a="$EXPO_ALPHA" 'BEGIN { printf "%.9f\n", -(a-0.3)*(a-0.3) }'
EOS
search() { # RUN, then expo search options
  local run=$1; shift
  "$EXPO" search --sft examples/tiny-sft --aligned examples/tiny-dpo \
    --eval "sh $W/eval.sh {output}" --run "$W/$run" "$@"
}
wait_running() { # until a job of the search runs
  for _ in $(seq 1 60); do
    squeue -h -t R -o %j | grep -q '^expo-' && return 0
    sleep 0.5
  done
  return 1
}

echo "== 1. the right alpha with -j 4 on 4 GPUs (--slurm '--gpus=1')"
t0=$(date +%s)
if search r1 -j 4 --slurm '--gpus=1' > "$W/r1.log" 2>&1; then
  tail -n 3 "$W/r1.log" | sed 's/^/  /'
  grep -q 'best alpha = 0.3' "$W/r1.log" && ok "best alpha 0.3 in $(( $(date +%s) - t0 )) s" || fail "wrong alpha"
  echo "  GPUs seen: $(cat "$W"/r1/trials/*/stderr.log | sed -n 's/.*gpu=\([0-9]*\).*/\1/p' | sort -u | tr '\n' ' ')"
  echo "  $(grep -c '"event":"job"' "$W/r1/ledger.jsonl") jobs for $(grep -c '"state":"ok"' "$W/r1/ledger.jsonl") evaluations; first batch submitted together: $(sed -n 's/.*"job_id":"\([0-9]*\)".*"trial":\([1-4]\)}.*/\1/p' "$W/r1/ledger.jsonl" | tr '\n' ' ')"
else
  cat "$W/r1.log"; fail "search 1"
fi
queue_empty "search 1"

echo "== 2. --timeout 3s on a job that never ends (--kill-after 2s)"
HANG_AT=0.1 search r2 -a 0.1 --no-baseline --timeout 3s --kill-after 2s --retries 0 --max-failures 1 --slurm '' > "$W/r2.log" 2>&1
rc=$?
tail -n 2 "$W/r2.log" | sed 's/^/  /'
[ $rc = 1 ] && grep -q 'timed out' "$W/r2.log" && ok "timed out, exit 1" || fail "timeout: exit $rc"
[ -s "$W/r2/trials/1/termed" ] && ok "the evaluator got SIGTERM first" || fail "no TERM reached the batch script"
queue_empty "the timeout"

for sig in INT TERM; do
  echo "== 3. SIG$sig to expo while a job runs"
  HANG_AT=0.1 "$EXPO" search --sft examples/tiny-sft --aligned examples/tiny-dpo --eval "sh $W/eval.sh {output}" \
    --run "$W/r3$sig" -a 0.1 --no-baseline --kill-after 2s --slurm '' > "$W/r3$sig.log" 2>&1 &
  pid=$!
  wait_running || fail "no job ran"
  kill -"$sig" $pid
  wait $pid
  rc=$?
  tail -n 1 "$W/r3$sig.log" | sed 's/^/  /'
  [ $rc = 130 ] && ok "SIG$sig: exit 130" || fail "SIG$sig: exit $rc"
  queue_empty "SIG$sig"
  [ -e "$W/r3$sig/alpha-0.1" ] && fail "the candidate is still there" || ok "candidate deleted after the job left the queue"
done

echo "== 4. kill -9 of expo, then --resume"
HANG_AT=0.2 "$EXPO" search --sft examples/tiny-sft --aligned examples/tiny-dpo --eval "sh $W/eval.sh {output}" \
  --run "$W/r4" --kill-after 2s --slurm '' > "$W/r4.log" 2>&1 &
pid=$!
for _ in $(seq 1 60); do squeue -h -t R -o %j | grep -q -- '-3$' && break; sleep 0.5; done
kill -9 $pid; wait $pid 2>/dev/null
echo "  after kill -9: $(squeue -h -o '%i %j %T' | tr '\n' ' ')"
[ "$(squeue -h | wc -l)" -ge 1 ] && ok "the job outlived expo (as Slurm does)" || fail "no orphan to find"
HANG_AT=none search r4 --resume --kill-after 2s --slurm '' > "$W/r4b.log" 2>&1
rc=$?
grep -E 'still in|best alpha' "$W/r4b.log" | sed 's/^/  /'
[ $rc = 0 ] && grep -q 'best alpha = 0.3' "$W/r4b.log" && ok "resumed: best 0.3" || { cat "$W/r4b.log"; fail "resume: exit $rc"; }
grep -q 'still in Slurm' "$W/r4b.log" && ok "the orphan was cancelled before anything else" || fail "the orphan was not named"
queue_empty "kill -9 + resume"

echo "== 5. a bad partition"
t0=$(date +%s)
search r5 --slurm '-p nosuch' > "$W/r5.log" 2>&1
rc=$?
tail -n 2 "$W/r5.log" | sed 's/^/  /'
[ $rc != 0 ] && grep -q 'invalid partition\|Invalid partition' "$W/r5.log" && ok "aborted at once (exit $rc, $(( $(date +%s) - t0 )) s) with Slurm's message" || fail "bad partition: exit $rc"
queue_empty "the bad partition"

echo "== 6. a drained node: --queue-timeout 5s"
scontrol update nodename="$NODE" state=drain reason=check-slurm
search r6 -a 0.1 --no-baseline --queue-timeout 5s --slurm '' > "$W/r6.log" 2>&1
rc=$?
scontrol update nodename="$NODE" state=resume
tail -n 1 "$W/r6.log" | sed 's/^/  /'
[ $rc != 0 ] && grep -q 'waited in the queue' "$W/r6.log" && ok "stopped with Slurm's reason (exit $rc)" || fail "drained node: exit $rc"
queue_empty "the drained node"

echo "== 7. queue time is not counted against --timeout"
blocker=$(sbatch --parsable --gpus=4 -o /dev/null --wrap 'sleep 8')
t0=$(date +%s)
EVAL_SLEEP=2 search r7 -a 0.1,0.2 --no-baseline -j 2 --timeout 5s --max-evals 2 --slurm '--gpus=1' > "$W/r7.log" 2>&1
rc=$?
tail -n 4 "$W/r7.log" | sed 's/^/  /'
took=$(( $(date +%s) - t0 ))
[ $rc = 0 ] && ! grep -q 'timed out' "$W/r7.log" && [ $took -ge 8 ] && ok "queued behind job $blocker for ~8 s, ran 2 s, not timed out ($took s in all)" || fail "queue wait: exit $rc in $took s"
queue_empty "the queue wait"

trap_w
if [ $FAILED = 0 ]; then echo "check-slurm: all passed"; else echo "check-slurm: FAILED"; exit 1; fi
