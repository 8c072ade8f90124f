#!/bin/bash
# Same tiny run (data, seed) to the export under several XLA CPU settings; prints the sha256 of the
# export and of the prepared splits. Equal hashes: the setting does not change the numbers.
# Usage: bash benchmarks/cpu_isa.sh [OUT_DIR]   (about 1-2 min per run on 2 cores)
cd "$(dirname "$0")/.."; out=${1:-runs/cpu_isa}
run() {  # name, then the environment prefix
  name=$1; shift
  env "$@" python launch/train.py --config configs/tpad_base.py:tiny --config.eval.models=tpad --stage=export \
    --workdir $out/$name > $out/$name.log 2>&1
  echo "$name $(sha256sum $out/$name/export/item_embeddings.npy | cut -c1-16) $(sha256sum $out/$name/data/prepared/*.npz | cut -c1-16 | tr '\n' ' ')"
}
mkdir -p $out
run default TPAD_NATIVE_ISA=1
run default_again TPAD_NATIVE_ISA=1
run avx2_pinned XLA_FLAGS=
run avx XLA_FLAGS=--xla_cpu_max_isa=AVX
run sse42 XLA_FLAGS=--xla_cpu_max_isa=SSE4_2
run one_thread taskset -c 0 env TPAD_NATIVE_ISA=1
