#!/usr/bin/env bash
# The real blind run of docs/blind.md: SCMoE against greedy on a moe-small trained here, judged
# automatically in both orders by a third model (a dense-small trained separately) and, for
# contrast, by the generating model itself and by a syntax hook (valid Python so far wins). Each step is short; run it under the shared lock:
#   OMP_NUM_THREADS=1 flock /tmp/heavy.lock nice -n 10 bash benchmarks/blind_real_run.sh
set -euo pipefail
MK="python -m moekit"
RUN=${RUN:-/tmp/blind_run}            # moekit train --preset moe-small --out $RUN --time-limit 240
JUDGE=${JUDGE:-/tmp/blind_judge_run}  # moekit train --preset dense-small --seed 7 --out $JUDGE --time-limit 240
OUT=${OUT:-/tmp/blind_real}
rm -rf "$OUT"
python benchmarks/blind_prompts.py --run "$RUN" --num 60 --out /tmp/blind_prompts.jsonl
$MK blind make --a "$RUN:decode=scmoe,max_new_tokens=48,name=scmoe" --b "$RUN:max_new_tokens=48,name=greedy" \
  --prompts /tmp/blind_prompts.jsonl --out "$OUT" --seed 2026
$MK blind judge "$OUT" --judge "loglik:$JUDGE" --name judge-dense
$MK blind judge "$OUT" --judge "loglik:$RUN" --name judge-self
$MK blind judge "$OUT" --judge "fn:moekit.blind.judge:python_prefix_judge" --name judge-python
$MK blind unblind "$OUT" --rater judge-dense --out "$OUT/unblind-dense"
$MK blind unblind "$OUT" --rater judge-self --out "$OUT/unblind-self"
$MK blind unblind "$OUT" --rater judge-python --out "$OUT/unblind-python"
$MK blind unblind "$OUT" --rater judge-dense --rater judge-self --out "$OUT/unblind-both"
