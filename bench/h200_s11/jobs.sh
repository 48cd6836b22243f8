# Job queue for the GPU window scripts (source it): job NAME CAP COMMAND... runs COMMAND in the background under
# min(CAP, END - SECONDS) seconds (not at all when fewer than 25 s are left), its output in $R/NAME.txt, its start
# and exit status in $R/jobs.txt. The caller sets R (output folder) and END (seconds by which every job has ended)
# and bounds the number of jobs at once with `wait -n`.
job() {
  local name=$1 cap=$2; shift 2
  local left=$(( END - SECONDS )); [ $left -gt $cap ] && left=$cap
  if [ $left -lt 25 ]; then echo "$name not started (${left}s left) at ${SECONDS}s" >> $R/jobs.txt; return; fi
  echo "$name start at ${SECONDS}s, limit ${left}s" >> $R/jobs.txt
  ( timeout -k 3 $left "$@" > $R/$name.txt 2>&1; echo "$name rc=$? at ${SECONDS}s" >> $R/jobs.txt ) &
}
