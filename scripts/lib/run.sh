# Shell pieces shared by scripts/bench and scripts/soak (sourced, not run). The caller sets PROG
# (its name for messages) and `keep` (true = keep the run directory even on success), then calls
# run_dir_init PREFIX, which makes $run_dir and stops every started part on exit.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '%s: %s\n' "${PROG:-script}" "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# apt_install PACKAGE...: installs Debian packages (nothing when none are named).
apt_install() {
  [ $# -gt 0 ] || return 0
  say "Installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pids=()
run_dir_init() { # PREFIX
  run_dir=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  chmod 755 "$run_dir"
  trap run_cleanup EXIT
  trap 'exit 130' INT TERM HUP
}

# stop_group PID...: SIGTERM (and SIGCONT, should it be stopped) to each process group, or to the
# process itself when it leads none (a background subshell); SIGKILL after 5 s.
stop_group() {
  local pid alive
  for pid in "$@"; do
    kill -TERM -- "-$pid" 2>/dev/null && kill -CONT -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    alive=false
    for pid in "$@"; do kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null && alive=true; done
    $alive || break
    sleep 0.1
  done
  for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}

# shellcheck disable=SC2317 # called by the EXIT trap
run_cleanup() {
  local status=$?
  trap - INT TERM HUP
  [ ${#pids[@]} -eq 0 ] || stop_group "${pids[@]}"
  wait 2>/dev/null || true
  if [ "$status" -eq 0 ] && ! ${keep:-false}; then
    rm -rf "$run_dir"
  else
    echo "${PROG:-script}: run directory kept: $run_dir" >&2
  fi
}

# start NAME COMMAND...: COMMAND in its own session (so its whole group can be stopped), output to
# $run_dir/NAME.log (appended, so a restarted part keeps its earlier log); sets last_pid.
start() {
  local name=$1
  shift
  setsid "$@" >>"$run_dir/$name.log" 2>&1 </dev/null &
  last_pid=$!
  pids+=("$last_pid")
}

wait_ready() { # NAME PID CHECK...
  local name=$1 pid=$2 deadline=$((SECONDS + 60))
  shift 2
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$run_dir/$name.log" >&2; die "$name exited during start-up"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 30 "$run_dir/$name.log" >&2; die "$name not ready in 60 s"; }
    sleep 0.1
  done
}
