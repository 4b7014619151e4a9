#!/usr/bin/env bash
# Fingerprint of what a sani binary writes, to show that a refactor changes no behaviour:
#   scripts/behaviour_fingerprint.sh BIN OUT_DIR > fingerprint.txt
# Runs the full demo, then sanitize (several option sets), finetune and eval on every test
# fixture, with 2 threads. Prints one "sha256  path" line per output file; JSON reports are
# hashed with timings and the command line removed (they differ run to run). Two binaries
# behave the same when their fingerprints are equal (diff them). Needs python3. ~5 min.
# safetensors files are hashed as their tensors plus their metadata as a sorted map: the
# safetensors writer orders metadata keys at random (a HashMap), so their bytes differ run to run.
set -euo pipefail
bin=$(realpath "$1")
out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$out"
mkdir -p "$out"
"$bin" demo --out "$out/demo" --threads 2 -q > "$out/demo.log" 2>&1
notes="$out/demo/notes.jsonl"
heldout="$out/demo/heldout.jsonl"
run() { "$bin" "$@" --threads 2 -q >> "$out/runs.log" 2>&1 || echo "exit $? from: $*" >> "$out/exits.txt"; }
for fx in "$root"/tests/fixtures/*/; do
  name=$(basename "$fx")
  run sanitize --model "$fx" --sensitive "$notes" --out "$out/$name-default" --epochs 2
  run sanitize --model "$fx" --sensitive "$notes" --out "$out/$name-paper" --config "$root/configs/paper.toml"
  run sanitize --model "$fx" --sensitive "$notes" --out "$out/$name-attr" --select attribution \
    --reset zero --train-scope last:1 --epochs 1 --grad-accum 2 --batch-size 4 --max-seq-len 64 --stride 32
  run sanitize --model "$fx" --sensitive "$notes" --out "$out/$name-act" --select activation \
    --repair-target mask --train-scope erased --epochs 1 --warmup-steps 2 --weight-decay 0.1 --bos never
  run sanitize --model "$fx" --sensitive "$notes" --out "$out/$name-base" --reset base \
    --base-model "$fx" --epochs 0
  run finetune --model "$fx" --data "$notes" --out "$out/$name-ft" --epochs 1 --last-blocks 1
  run eval --model "$fx" --sensitive "$notes" --control "$heldout" --perplexity "$heldout" \
    --samples 2 --json "$out/$name-eval.json" --per-span "$out/$name-spans.jsonl" --max-rate 0.5
  run eval --model "$fx" --sensitive "$notes" --prefix-tokens 8 --max-new-tokens 3 --bos always \
    --json "$out/$name-eval2.json" --max-count 3
done
python3 "$root/scripts/fingerprint_dir.py" "$out"
