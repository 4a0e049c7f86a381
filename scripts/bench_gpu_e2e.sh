#!/usr/bin/env bash
# The end-to-end GPU benchmark set of docs/benchmarks.md, in one go, on one card:
#   scripts/bench_gpu_e2e.sh OUT_DIR [part]
# part: llama2 (paged, paged without decode bursts, paged without prefix caching, contiguous at
# max_model_len 4096 and 2048, all at the paged run's KV memory), prefix (the shared-prefix
# workload with ~80- and ~340-token prefixes, prefix caching on and off), others (llama-1b and
# llama3-8b, paged with and without bursts, llama3-8b contiguous), hf (HF transformers
# generate, the workload's first 64 requests), ratios (issue 13's set, every run on the whole
# 1000-request workload: llama2-7b paged and contiguous at 4096 and 2048, llama3-8b paged and
# contiguous at 2048, llama-1b paged, then hf; ratios1 and ratios2 are its two halves, for
# machines that limit one command's time), or all (default). One persistent compilation cache
# serves every run (the first run's warmup is the cold figure). Each run writes
# <tag>.json/.md/.png under OUT_DIR.
set -u -o pipefail
out=${1:?usage: bench_gpu_e2e.sh OUT_DIR [llama2|prefix|others|hf|ratios|ratios1|ratios2|all]}
part=${2:-all}
mkdir -p "$out"
cache=${PAGED_JAX_BENCH_CACHE:-/tmp/paged_jax_bench_cache}
here=$(cd "$(dirname "$0")" && pwd)
bench() { python3 "$here/bench_throughput.py" --out "$out" "$@" compilation_cache_dir="$cache"; }
pages() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_pages'])" "$1"; }

if [[ $part == llama2 || $part == all ]]; then
  m=random:llama2-7b
  bench --model $m max_model_len=4096 max_num_seqs=512 --tag llama2-7b-paged
  n=$(pages "$out/llama2-7b-paged.json")
  bench --model $m max_model_len=4096 max_num_seqs=512 --no-prefix-caching \
    --tag llama2-7b-paged-nocache
  bench --model $m max_model_len=4096 max_num_seqs=512 decode_steps=1 \
    --tag llama2-7b-paged-steps1
  bench --model $m max_model_len=4096 max_num_seqs=512 --contiguous num_pages="$n" \
    --num-requests 200 --tag llama2-7b-contiguous-4096
  bench --model $m max_model_len=2048 max_num_seqs=512 --contiguous num_pages="$n" \
    --num-requests 300 --tag llama2-7b-contiguous-2048
fi
if [[ $part == prefix || $part == all ]]; then
  for p in 80 340; do
    bench --model random:llama2-7b --workload shared-prefix --prefix-len $p max_num_seqs=512 \
      --tag llama2-7b-prefix$p-cache
    bench --model random:llama2-7b --workload shared-prefix --prefix-len $p max_num_seqs=512 \
      --no-prefix-caching --tag llama2-7b-prefix$p-nocache
  done
fi
if [[ $part == others || $part == all ]]; then
  for m in llama-1b llama3-8b; do
    bench --model random:$m max_num_seqs=512 --tag $m-paged
    bench --model random:$m max_num_seqs=512 decode_steps=1 --tag $m-paged-steps1
  done
  n=$(pages "$out/llama3-8b-paged.json")
  bench --model random:llama3-8b max_num_seqs=512 --contiguous num_pages="$n" \
    --num-requests 300 --tag llama3-8b-contiguous-2048
fi
if [[ $part == ratios || $part == ratios1 ]]; then
  m=random:llama2-7b
  bench --model $m max_model_len=4096 max_num_seqs=512 --tag llama2-7b-paged
  n=$(pages "$out/llama2-7b-paged.json")
  bench --model $m max_model_len=4096 max_num_seqs=512 --contiguous num_pages="$n" \
    --tag llama2-7b-contiguous-4096-all
  bench --model $m max_model_len=2048 max_num_seqs=512 --contiguous num_pages="$n" \
    --tag llama2-7b-contiguous-2048-all
fi
if [[ $part == ratios || $part == ratios2 ]]; then
  bench --model random:llama3-8b max_num_seqs=512 --tag llama3-8b-paged
  n=$(pages "$out/llama3-8b-paged.json")
  bench --model random:llama3-8b max_num_seqs=512 --contiguous num_pages="$n" \
    --tag llama3-8b-contiguous-2048-all
  bench --model random:llama-1b --num-requests 500 --tag llama-1b-paged-500
fi
if [[ $part == hf || $part == all || $part == ratios || $part == ratios2 ]]; then
  python3 "$here/bench_hf.py" --model random:llama2-7b --num-requests 64 --batch-size 32 \
    --out "$out" --tag hf-llama2-7b
fi
