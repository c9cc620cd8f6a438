#!/usr/bin/env bash
# The main job on the embedded default: tiny model, a small dataset, one real worker process, status.
# Nothing to configure: SQLite job store and broker, images in a local folder, all under FARM_HOME (./.farm).
set -euo pipefail
cd "$(dirname "$0")/.."
home="${FARM_HOME:-$PWD/.farm}"
export FARM_HOME="$home"
started=$(date +%s)

echo "== 1. tiny PixArt-δ model (random weights, built offline)"
if [ ! -f "$home/models/tiny/model_index.json" ]; then farm models make-tiny; else echo "already at $home/models/tiny"; fi

echo "== 2. submit examples/prompts.txt as dataset 'demo' (2 images per prompt)"
# The demo names the random-weight tiny model; without --model the farm renders the PixArt-δ release.
farm submit examples/prompts.txt --dataset demo --model tiny --images-per-prompt 2

echo "== 3. one worker process until the dataset is done"
farm worker --loglevel WARNING > "$home/demo-worker.log" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true; wait $worker 2>/dev/null || true' EXIT
farm status demo --watch --interval-s 0.5
kill -TERM "$worker"; wait "$worker" || true
trap - EXIT

echo "== 4. result"
farm status demo
farm jobs demo --limit 3
farm preview demo --out "$home/demo-preview" --columns 8
echo "images: $home/images/demo/ ($(ls "$home/images/demo" | wc -l) files); worker log: $home/demo-worker.log"
echo "demo took $(( $(date +%s) - started )) s"
farm status demo --json | python3 -c 'import json,sys; [s]=json.load(sys.stdin); sys.exit(0 if s["counts"]["failed"] == 0 and s["done"] else 1)'
