#!/usr/bin/env bash
# Runs `vestibule check` on every config.toml under deploy/, with dummy values for the environment
# variables the files interpolate. Exit 0 only if every file passes.
#
#   cargo build && tests/deploy/check_configs.sh
#   VESTIBULE_BIN=target/release/vestibule tests/deploy/check_configs.sh
#
# Each check runs in the config's own directory, as in the container (WORKDIR /etc/vestibule), so
# relative paths such as static_dir = "./public" resolve the same way in both places.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${VESTIBULE_BIN:-target/debug/vestibule}
case $bin in
  /*) ;;
  *) bin="$root/$bin" ;;
esac
if [[ ! -x $bin ]]; then
  echo "check_configs: no vestibule binary at $bin (run cargo build, or set VESTIBULE_BIN)" >&2
  exit 1
fi

# Dummy values: never real secrets. Session keys come from the binary itself, so their format is
# whatever `vestibule check` expects.
key() {
  local k
  k=$("$bin" keygen) || { echo "check_configs: '$bin keygen' failed" >&2; exit 1; }
  printf '%s' "$k"
}
export VESTIBULE_CLIENT_SECRET=dummy-client-secret-for-config-checks
VESTIBULE_SESSION_KEY=$(key)
VESTIBULE_SESSION_KEY_NEXT=$(key)
VESTIBULE_SESSION_KEY_OLD=$(key)
export VESTIBULE_SESSION_KEY VESTIBULE_SESSION_KEY_NEXT VESTIBULE_SESSION_KEY_OLD
export REDIS_URL=redis://127.0.0.1:6379/0
export VESTIBULE_PORT=8081
export VESTIBULE_ADMIN_PORT=9091

passed=0
failed=0
while IFS= read -r -d '' file; do
  rel=${file#"$root"/}
  if out=$(cd "$(dirname "$file")" && "$bin" check --config config.toml 2>&1); then
    echo "ok    $rel"
    passed=$((passed + 1))
  else
    echo "FAIL  $rel"
    printf '%s\n' "$out" | sed 's/^/      /'
    failed=$((failed + 1))
  fi
done < <(find "$root/deploy" -name config.toml -type f -print0 | sort -z)

if ((passed + failed == 0)); then
  echo "check_configs: no config.toml under deploy/" >&2
  exit 1
fi
echo "$passed passed, $failed failed"
((failed == 0))
