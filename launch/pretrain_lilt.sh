#!/usr/bin/env bash
# The LilT paper's lilt run (base/base, 256 px, 128 per GPU x 4 GPUs, 15 epochs); see pretrain_paper.sh.
exec "$(dirname "$0")/pretrain_paper.sh" lilt "$@"
