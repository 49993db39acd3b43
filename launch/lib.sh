#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run).

# Prints a command so that it can be copied into a shell.
quote_cmd() {
  local arg out=""
  for arg in "$@"; do
    if [[ $arg =~ ^[[:alnum:]_./:=@%+,-]+$ ]]; then
      out+=" $arg"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "${out# }"
}
