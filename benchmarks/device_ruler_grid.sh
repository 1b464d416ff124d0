#!/bin/bash
# One device call (after the Qwen pieces (10 of 50 MB) were shipped to ~/ship, see benchmarks/ship_model.py): join and convert the model
# once, then, at the same time, the RULER-4k grid through --workers and the optional jobs below. Writes into $OUT.
#   RULER_S, WORKERS, SAMPLES: the grid's time limit, worker processes, samples per task
#   POL, KEEPS, PROTOCOLS: the grid's policies, keeps and protocols, in the order their units run; or
#   PASSES: space-separated runs one after the other, each KEEPS/PROTOCOLS/POLICIES (e.g. "0.125/query-aware/merge(snapkv)")
#   RESUME: a recorded run directory under benchmarks/results to continue (its config.json and samples.jsonl.gz)
#   PROFILE=1: first, 4k-token engine prefills per policy, host vs GPU time, per batch of PROFILE_BATCHES prompts
#     (benchmarks/prefill_syncs.py; PREFILL_ARGS adds to its options)
#   GPU_TESTS=1: the CUDA-only engine tests beside the runs (pytest from .whl-test, carried)
#   KVP=1: the kvpress side by side (carry .whl-kvpress)
#   LONGGEN=1: the long-generation task (4k context: a ~1k-token list repeated for ~3k tokens) per LONGGEN_POL
#   QUEST=1: RULER-32k, full vs Quest, QUEST_SAMPLES per task, through the engine
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
[ -d .whl-test ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-test/*.whl
[ -d .whl-kvpress ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvpress-site .whl-kvpress/*.whl
export PYTHONPATH=src:/tmp/site
python3 benchmarks/ship_model.py join qwen2.5-coder-0.5b --pieces ~/ship 2>&1 | tail -1 || exit 1
python3 -c "from kvslim.models import resolve; import time; t=time.time(); resolve('qwen2.5-coder-0.5b').load(None,'cpu','sdpa',0,False); print('converted', time.time()-t)" 2>&1 | tail -1
echo "ready after $(( $(date +%s) - T0 )) s"
if [ "${PROFILE:-0}" = 1 ]; then  # before anything else runs on the GPU: these are timings
  for b in ${PROFILE_BATCHES:-1 8}; do
    python3 benchmarks/prefill_syncs.py --model qwen2.5-coder-0.5b --dtype bfloat16 --device cuda --tokens 4096 --iters 3 \
      --paths engine --batch $b --out $OUT/prefill_syncs_b$b.json $PREFILL_ARGS 2>&1 | grep -v "USDT\|Warn\|warn"
  done
fi
if [ "${GPU_TESTS:-0}" = 1 ]; then  # beside the runs below: correctness only
  ( timeout 300 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs.py tests/engine/test_head_decode.py \
      tests/engine/test_paged_attention.py tests/engine/test_think_engine.py tests/engine/test_quest_engine.py \
      > /tmp/gputests.log 2>&1; echo "gpu tests rc $?" >> /tmp/gputests.log ) &
fi
POL=${POL:-'full,snapkv,pyramidkv,adakv,streaming,tova,knorm,keydiff,lagkv,expected_attention,adakv(expected_attention),kvzip,h2o,merge(snapkv),auto,think(ratio=0.5),auto(tolerance=0.1),auto(tolerance=0.2)'}
R=/tmp/ruler4k
if [ -n "$RESUME" ]; then mkdir -p $R && cp $RESUME/config.json $R/ && zcat $RESUME/samples.jsonl.gz > $R/samples.jsonl; fi
END=$(( $(date +%s) + ${RULER_S:-300} ))
( for pass in ${PASSES:-"${KEEPS:-0.25,0.125,0.5,0.75}/${PROTOCOLS:-query-aware,query-agnostic}/$POL"}; do
    IFS=/ read -r keeps protocols policies <<< "$pass"; left=$(( END - $(date +%s) )); [ $left -gt 30 ] || break
    echo "pass $keeps $protocols $policies ($left s left)" >> /tmp/ruler.log
    timeout -s INT -k 25 $left python3 -m kvslim.cli bench --suite ruler --model qwen2.5-coder-0.5b --device cuda --engine \
      --kv-memory 4 --workers ${WORKERS:-2} --lengths 4k --samples ${SAMPLES:-10} --keep $keeps --protocols $protocols \
      --policies "$policies" --out $R --no-progress >> /tmp/ruler.log 2>&1
    echo "ruler rc $?" >> /tmp/ruler.log
  done ) &
if [ "${LONGGEN:-0}" = 1 ]; then  # one process per space-separated group of LONGGEN_POL, each its own directory
  i=0
  for group in ${LONGGEN_POL:-"full,rkv(budget=1280)"}; do
    i=$((i + 1))
    ( timeout -s INT -k 25 ${RULER_S:-300} python3 -m kvslim.cli bench --model qwen2.5-coder-0.5b --device cuda --tasks longgen \
       --lengths 4k --keep 1 --samples ${LONGGEN_SAMPLES:-4} --batch-size ${LONGGEN_SAMPLES:-4} --policies "$group" \
       --out /tmp/longgen/$i --no-progress > /tmp/longgen$i.log 2>&1; echo "longgen $group rc $?" >> /tmp/longgen$i.log ) &
  done
fi
if [ "${QUEST:-0}" = 1 ]; then
  ( timeout -s INT -k 25 ${RULER_S:-300} python3 -m kvslim.cli bench --suite ruler --model qwen2.5-coder-0.5b --device cuda \
     --engine --kv-memory 8 --lengths 32k --samples ${QUEST_SAMPLES:-3} --protocols query-aware \
     --policies "full,quest(budget=2048)" --out /tmp/quest32k --no-progress > /tmp/quest.log 2>&1; echo "quest rc $?" >> /tmp/quest.log ) &
fi
D=/tmp/kvp
if [ "${KVP:-0}" = 1 ]; then
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
pkill -f "m kvslim.cli bench" 2>/dev/null  # stragglers; it ends ANY such process here: run other jobs after this script, not beside it
for f in /tmp/gputests.log /tmp/ruler.log /tmp/longgen*.log /tmp/quest.log /tmp/kvp.log; do [ -f $f ] && grep -v "Loading\|Converting" $f | tail -4; done
cat /tmp/longgen*.log > /tmp/longgen.log 2>/dev/null; cp /tmp/gputests.log /tmp/ruler.log /tmp/longgen.log /tmp/quest.log $OUT/ 2>/dev/null
tar czf $OUT/runs.tgz -C /tmp ruler4k $( [ -d /tmp/longgen ] && echo longgen ) $( [ -d /tmp/quest32k ] && echo quest32k )
echo "total $(( $(date +%s) - T0 )) s"
