#!/usr/bin/env bash
# The NIN CPU budget protocol (DESIGN.md section 5): see budget_protocol.sh.
#   bash scripts/nin_budget_protocol.sh [OUT_DIR]     (default outputs/nin_budget)
exec bash "$(dirname "$0")/budget_protocol.sh" nin "$@"
