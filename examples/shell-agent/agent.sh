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
  # a JSON string's body: backslash, double quote and tab escaped
  escaped=$(printf '%s' "$file" | sed 's/\\/\\\\/g; s/"/\\"/g; s/	/\\t/g')
  if [ -r "$file" ]; then
    size=$(wc -c < "$file")
    printf '{"path":"%s","size":%s}\n' "$escaped" "$size" >> "$out"
  else
    baqup emit event PERMISSION_DENIED --path "$file" --message "not readable"
  fi
  done=$((done + 1))
  # Once per file, so the line is written by the shell's own printf: `baqup emit`
  # would start a Python interpreter for each file. baqup-run checks the line as it
  # checks baqup emit's (a bad one is a PROTOCOL_ERROR warning, never fatal).
  printf '{"type":"progress","files_processed":%d,"percent_complete":%d,"current_file":"%s"}\n' \
    "$done" "$((done * 100 / (total > 0 ? total : 1)))" "$escaped" >&"$BAQUP_CONTROL_FD"
done
baqup emit intent --clear
baqup emit artifact listing.jsonl
baqup emit metadata type=listing "path=$src" "files_included=$total"
baqup emit log "listing written" --context "files=$total"
