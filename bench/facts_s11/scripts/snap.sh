#!/bin/bash
# usage: bash snap.sh REV [PATHSPEC...]  -> .dev/head.tgz (git archive of REV, only PATHSPECs when given) and .dev/head.rev
cd /work/main && mkdir -p .dev && git archive --format=tar.gz -o .dev/head.tgz "$@" && git rev-parse --short "$1" > .dev/head.rev && ls -la .dev/head.tgz && cat .dev/head.rev
