#!/bin/bash
# One device call (after the 9 Qwen pieces were shipped to ~/ship, see benchmarks/ship_model.py): join and convert the model
# once, then the RULER-4k grid through --workers and the kvpress side by side at the same time (RULER_S, WORKERS,
# SAMPLES override the time limit, worker count and samples per task; POL and KEEPS the policies and keeps, in the order
# their units run; RESUME a recorded run directory under benchmarks/results to continue; PROFILE=1 first times one
# 4k-token prefill per policy, host vs GPU (benchmarks/prefill_syncs.py); KVP=0 skips kvpress). Writes into $OUT.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvpress-site .whl-kvpress/*.whl
export PYTHONPATH=src:/tmp/site
python3 benchmarks/ship_model.py join qwen2.5-coder-0.5b --pieces ~/ship || exit 1
python3 -c "from kvslim.models import resolve; import time; t=time.time(); resolve('qwen2.5-coder-0.5b').load(None,'cpu','sdpa',0,False); print('converted', time.time()-t)"
echo "ready after $(( $(date +%s) - T0 )) s"
POL=${POL:-'full,snapkv,pyramidkv,adakv,streaming,tova,knorm,keydiff,lagkv,expected_attention,adakv(expected_attention),kvzip,h2o,merge(snapkv),auto,think(ratio=0.5),lowrank(rank=16),lowrank(rank=32),lowrank(rank=16,bits=4),lowrank(rank=32,bits=4),auto(tolerance=0.1),auto(tolerance=0.2)'}
R=/tmp/ruler4k
if [ -n "$RESUME" ]; then mkdir -p $R && cp $RESUME/config.json $R/ && zcat $RESUME/samples.jsonl.gz > $R/samples.jsonl; fi
if [ "${PROFILE:-0}" = 1 ]; then
  python3 benchmarks/prefill_syncs.py --model qwen2.5-coder-0.5b --dtype bfloat16 --device cuda --tokens 4096 --iters 3 \
    --paths engine --out $OUT/prefill_syncs_h200.json 2>&1 | grep -v USDT
fi
( timeout -s INT -k 25 ${RULER_S:-300} python3 -m kvslim.cli bench --suite ruler --model qwen2.5-coder-0.5b --device cuda \
   --engine --kv-memory 4 --workers ${WORKERS:-10} --lengths 4k --samples ${SAMPLES:-10} --keep ${KEEPS:-0.25,0.125,0.5,0.75} \
   --policies "$POL" --out $R --no-progress > /tmp/ruler.log 2>&1; echo "ruler rc $?" >> /tmp/ruler.log ) &
D=/tmp/kvp
if [ "${KVP:-1}" = 1 ]; then
M=full,snapkv,snapkv@kvpress,streaming,tova,knorm,expected_attention,kvzip
A="--model qwen2.5-coder-0.5b --length 4096 --tasks niah_single_1,niah_multikey_1,niah_multivalue,vt --samples 3 --kept-samples 1 --methods $M --protocols query-agnostic --out $D --site /tmp/kvpress-site"
python3 benchmarks/kvpress_compare.py $A --sides none > /tmp/kvp.log 2>&1
( timeout 240 python3 benchmarks/kvpress_side.py $D --site /tmp/kvpress-site >> /tmp/kvp.log 2>&1 ) &
P1=$!
( timeout 240 python3 benchmarks/kvpress_compare.py $A --sides kvslim >> /tmp/kvp.log 2>&1 ) &
P2=$!
wait $P1 $P2
python3 benchmarks/kvpress_compare.py $A --sides none >> /tmp/kvp.log 2>&1
mkdir -p $OUT/kvp && cp $D/comparison.json $D/report.md $OUT/kvp/ 2>/dev/null
cp /tmp/kvp.log $OUT/
fi
wait
pkill -f "kvslim" 2>/dev/null
tail -5 /tmp/ruler.log; tail -8 /tmp/kvp.log 2>/dev/null
cp /tmp/ruler.log $OUT/
tar czf $OUT/ruler4k.tgz -C /tmp ruler4k
echo "total $(( $(date +%s) - T0 )) s"
