# Sourced by the device scripts (tools/device_check.sh, tools/device_nvidia.sh): run one named step.
#   step NAME LIMIT_S COMMAND...   runs COMMAND when NAME is in $STEPS, under `timeout LIMIT_S`,
#   logging to $L/NAME.log, then prints its exit status, its time and the log's last $TAIL lines.
step() {
  local name=$1 limit=$2 start=$(date +%s)
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  timeout "$limit" "$@" > "$L/$name.log" 2>&1
  echo "== $name: rc $? in $(( $(date +%s) - start )) s"
  tail -n "${TAIL:-15}" "$L/$name.log"
}
