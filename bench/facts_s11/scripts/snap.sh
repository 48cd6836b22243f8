#!/bin/bash
# usage: bash .dev/snap.sh REV  -> .dev/head.tgz (git archive of REV) and .dev/head.rev
cd /work/main && git archive --format=tar.gz -o .dev/head.tgz "$1" && git rev-parse --short "$1" > .dev/head.rev && ls -la .dev/head.tgz && cat .dev/head.rev
