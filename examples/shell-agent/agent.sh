#!/usr/bin/env sh
# A shell agent: dumps a directory's listing and contents as JSON lines, reporting
# progress, an intent and events through `baqup emit`. Run it under baqup-run:
#
#   BAQUP_SOURCE_PATH=/data baqup-run -- ./examples/shell-agent/agent.sh
#
# baqup-run gives it $BAQUP_WORK_DIR and the control channel ($BAQUP_CONTROL_FD).
set -eu
src="${BAQUP_SOURCE_PATH:?set BAQUP_SOURCE_PATH}"
out="$BAQUP_WORK_DIR/listing.jsonl"
total=$(find "$src" -type f | wc -l)
baqup emit intent list_files --expected-seconds 30 --detail "$src"
done=0
: > "$out"
find "$src" -type f | while IFS= read -r file; do
  if [ -r "$file" ]; then
    size=$(wc -c < "$file")
    escaped=$(printf '%s' "$file" | sed 's/\\/\\\\/g; s/"/\\"/g')
    printf '{"path":"%s","size":%s}\n' "$escaped" "$size" >> "$out"
  else
    baqup emit event PERMISSION_DENIED --path "$file" --message "not readable"
  fi
  done=$((done + 1))
  baqup emit progress --files "$done" --percent "$((done * 100 / (total > 0 ? total : 1)))" \
    --current-file "$file"
done
baqup emit intent --clear
baqup emit artifact listing.jsonl
baqup emit metadata type=listing "path=$src" "files_included=$total"
baqup emit log "listing written" --context "files=$total"
