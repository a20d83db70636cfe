#!/usr/bin/env bash
# pack_logs DIR: the logs of a GPU run (DIR/*.log, DIR/*.txt) into DIR/logs.tar.gz, the loose copies
# removed. The device tool brings back at most 8 files from $OUT; results (.json, .md, .png) stay loose.
# Sourced by bench/gpu_tune.sh and bench/gpu_check.sh; bench/collect_tune.py reads the archive.
pack_logs() {
  local dir=$1 logs=() f
  for f in "$dir"/*.log "$dir"/*.txt; do
    [ -f "$f" ] && logs+=("$(basename "$f")")
  done
  (( ${#logs[@]} )) || return 0
  if tar -czf "$dir/logs.tar.gz" -C "$dir" "${logs[@]}"; then
    (cd "$dir" && rm -f "${logs[@]}")
    echo "logs packed into $dir/logs.tar.gz: ${logs[*]}"
  fi
  local n
  n=$(find "$dir" -type f | wc -l)
  (( n > 8 )) && echo "warning: $n files in $dir (the device tool brings back 8)"
  return 0
}
