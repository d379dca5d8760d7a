#!/usr/bin/env bash
# A/B of the serving path between two git revisions: the same bundle, the same request bodies and the
# same load generator (serve_bench.py's), one `mtrank serve` at a time, configurations alternating
# round by round; prints per-round req/s and p50/p99, then medians and the median of paired ratios.
#
#   env -u OPENBLAS_CORETYPE bash benchmarks/serve_ab.sh BASE_REV [NEW_REV|WORKTREE] [ROUNDS]
#
# NEW defaults to the working tree. Needs a bundle and bodies from a serve_bench.py run:
#   env -u OPENBLAS_CORETYPE python benchmarks/serve_bench.py --workdir /tmp/sb --skip-inprocess --no-docs --quick
# (SB=/tmp/sb by default). Server: 1 worker, MTRANK_ONNX__INTRA_OP_THREADS=1; load: 8 connections,
# 2 s warm-up + 12 s measured.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${1:?usage: serve_ab.sh BASE_REV [NEW_REV] [ROUNDS]}; NEW=${2:-WORKTREE}; ROUNDS=${3:-7}
SB=${SB:-/tmp/sb}; OUT=$(mktemp -d /tmp/serve-ab.XXXXXX)
BUNDLES=$SB/bundles; BODIES=$SB/bodies-http.jsonl
[[ -f $BUNDLES/CURRENT && -f $BODIES ]] || { echo "no bundle/bodies under $SB (see the header)"; exit 2; }
tree() { # rev -> a checkout of it
  if [[ $1 == WORKTREE ]]; then echo "$ROOT"; else git -C "$ROOT" worktree add -q --detach "$OUT/$2" "$1"; echo "$OUT/$2"; fi; }
A=$(tree "$BASE" base); B=$(tree "$NEW" new)
cleanup() { for t in "$OUT/base" "$OUT/new"; do [[ -d $t ]] && git -C "$ROOT" worktree remove --force "$t"; done; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for r in $(seq "$ROUNDS"); do
  for side in base new; do
    dir=$A; [[ $side == new ]] && dir=$B
    p=$(port)
    (cd "$dir" && PYTHONPATH=$dir MTRANK_ONNX__INTRA_OP_THREADS=1 exec python3 -m mtrank.cli serve --bundles "$BUNDLES" \
       --port "$p" > "$OUT/server-$side-$r.log" 2>&1) & pid=$!
    for _ in $(seq 120); do curl -sf "localhost:$p/readyz" > /dev/null && break; sleep 0.5; done
    python3 "$ROOT/benchmarks/serve_bench.py" _loadgen --port "$p" --bodies "$BODIES" --concurrency 8 --duration 12 \
      --warmup 2 --max-requests 100000 --expect-items 100 --out "$OUT/$side-$r.json"
    kill "$pid"; wait "$pid" 2> /dev/null || true
  done
done
python3 - "$OUT" "$ROUNDS" "$BASE" "$NEW" <<'PY'
import json, statistics as st, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(side, r):
    d = json.load(open(f"{out}/{side}-{r}.json")); lat = sorted(d["latencies"])
    assert d["errors"] == 0 and d["exceptions"] == 0, f"{side} round {r}: errors"
    return d["requests"] / d["elapsed_s"], lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3
res = {s: [load(s, r) for r in range(1, rounds + 1)] for s in ("base", "new")}
for r in range(rounds):
    print(f"round {r + 1}: " + "  ".join(f"{s} {res[s][r][0]:.1f} req/s p50 {res[s][r][1]:.1f} p99 {res[s][r][2]:.1f} ms" for s in res))
med = {s: [st.median(x[i] for x in res[s]) for i in range(3)] for s in res}
print(f"median req/s: base ({sys.argv[3]}) {med['base'][0]:.1f}, new ({sys.argv[4]}) {med['new'][0]:.1f}; "
      f"paired ratio new/base median {st.median(n[0] / b[0] for n, b in zip(res['new'], res['base'])):.3f}")
print(f"median p50 ms: base {med['base'][1]:.1f}, new {med['new'][1]:.1f}; median p99 ms: base {med['base'][2]:.1f}, new {med['new'][2]:.1f}")
PY
