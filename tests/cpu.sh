#!/usr/bin/env bash
# One line: the CPU model and which of the features the code branches on it has.
model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2-) "
features=""
for f in avx512f avx512_bf16 amx_bf16; do
  case "$flags" in *" $f "*) features+=" $f=yes" ;; *) features+=" $f=no" ;; esac
done
echo "CPU: ${model:-unknown} ($(nproc) cores);$features"
