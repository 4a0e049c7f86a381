#!/usr/bin/env bash
# Scale-out runs for a two-GPU host (issue 19; docs/scale-out.md has the paper model to check):
#   scripts/bench_tp.sh OUT_DIR [equal|tp|dp|70b|all]
# equal: greedy outputs of random:llama3-8b in f32 at tensor_parallel_size 1 and 2 on the same
#        48-request sample, compared line by line (expect every line identical);
# tp:    paged-jax bench of random:llama3-8b (bf16) at tp 1 then tp 2, back to back;
# dp:    the sample through 2 data-parallel processes (one GPU each, jax.distributed on
#        127.0.0.1) against one process on one GPU: the merged file must equal it;
# 70b:   paged-jax bench of random:llama3-70b at tp 2 (140 GB of bf16 weights: drawn on the
#        host, then placed shard by shard; slow to start);
# all (default): equal, tp, dp.
set -u -o pipefail
out=${1:?usage: bench_tp.sh OUT_DIR [equal|tp|dp|70b|all]}
part=${2:-all}
mkdir -p "$out"
cache=${PAGED_JAX_BENCH_CACHE:-/tmp/paged_jax_bench_cache}
py=${PYTHON:-python3}
small="max_model_len=2048 max_num_seqs=64 max_num_batched_tokens=1024 compilation_cache_dir=$cache"

$py - "$out/sample.jsonl" <<'EOF'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for i in range(48):
        ids = [rng.randrange(1, 128000) for _ in range(rng.randrange(8, 400))]
        f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": 64, "temperature": 0.0,
                            "ignore_eos": True, "detokenize": False}) + "\n")
EOF
compare() {  # identical lines of two outputs; first differing line
  $py - "$1" "$2" <<'EOF'
import json, sys
a, b = (open(p).read().splitlines() for p in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
print(json.dumps({"compare": sys.argv[1:3], "lines": [len(a), len(b)], "identical": same,
                  "first_diff": diff[:1]}))
EOF
}
gen() { $py -m paged_jax.cli generate --model random:llama3-8b --input "$out/sample.jsonl" \
          --quiet "$@"; }

if [[ $part == equal || $part == all ]]; then
  gen --output "$out/greedy_tp1.jsonl" dtype=float32 $small tensor_parallel_size=1
  gen --output "$out/greedy_tp2.jsonl" dtype=float32 $small tensor_parallel_size=2
  compare "$out/greedy_tp1.jsonl" "$out/greedy_tp2.jsonl"
fi
if [[ $part == tp || $part == all ]]; then
  for n in 1 2; do
    $py -m paged_jax.cli bench --model random:llama3-8b --out "$out" --tag llama3-8b-tp$n \
      max_model_len=4096 max_num_seqs=512 tensor_parallel_size=$n compilation_cache_dir="$cache"
  done
fi
if [[ $part == dp || $part == all ]]; then
  CUDA_VISIBLE_DEVICES=0 gen --output "$out/dp1.jsonl" $small
  port=$((20000 + RANDOM % 20000))
  for i in 0 1; do
    CUDA_VISIBLE_DEVICES=$i gen --output "$out/dp2.jsonl" $small \
      --coordinator-address 127.0.0.1:$port --num-processes 2 --process-id $i &
  done
  wait
  compare "$out/dp1.jsonl" "$out/dp2.jsonl"
fi
if [[ $part == 70b ]]; then
  $py -m paged_jax.cli bench --model random:llama3-70b --out "$out" --tag llama3-70b-tp2 \
    max_model_len=4096 max_num_seqs=256 tensor_parallel_size=2 compilation_cache_dir="$cache"
fi
