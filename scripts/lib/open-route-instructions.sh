#!/usr/bin/env bash
# scripts/lib/open-route-instructions.sh BIN LABEL: instructions per request of the Vestibule
# binary BIN on an `auth = "none"` route under callgrind (nginx upstream, 2 workers, wrk at 8
# connections, 3 rounds; each round's count minus an idle baseline of the same length). Counted,
# not timed: an A/B of two builds (e.g. two commits' `cargo build --release`) is repeatable on a
# busy machine. Needs nginx, wrk, valgrind and curl.
set -euo pipefail
bin=$(realpath "$1"); label=$2  # absolute: the script works in its run directory
dir=$(mktemp -d /tmp/ab.XXXX)
up=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
vp=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
ap=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat >"$dir/nginx.conf" <<NG
worker_processes 1; daemon off; pid $dir/nginx.pid; error_log $dir/nginx.err;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '{"items":[1,2,3],"ok":true,"upstream":"nginx","padding":"xxxxxxxxxxxx"}'; } } }
NG
nginx -c "$dir/nginx.conf" -p "$dir" & ngpid=$!
cat >"$dir/config.toml" <<CF
[server]
listen = "127.0.0.1:$vp"
public_url = "http://127.0.0.1:$vp"
workers = 2
[admin]
listen = "127.0.0.1:$ap"
[log]
level = "warn"
[oidc]
issuer = "http://127.0.0.1:9"
allow_http_issuer = true
client_id = "vestibule"
client_secret = "secret"
[session]
cookie_secure = false
keys = ["MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="]
[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:$up"
auth = "none"
CF
cd "$dir"
valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out.%p" "$bin" --config "$dir/config.toml" >"$dir/v.log" 2>&1 & vpid=$!
for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$vp/api/x" && break; sleep 0.2; done
# vestibule's pid under valgrind is the valgrind process itself
wrk -t1 -c8 -d5s "http://127.0.0.1:$vp/api/items" >/dev/null
total() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }
dump() { local before; before=$(ls "$dir"/cg.out.* | wc -l); callgrind_control -d "$1" "$vpid" >/dev/null 2>&1;
  for _ in $(seq 100); do [ "$(ls "$dir"/cg.out.* | wc -l)" -gt "$before" ] && break; sleep 0.1; done
  total "$(ls -t "$dir"/cg.out.* | head -1)"; }
for r in 1 2 3; do
  callgrind_control -z "$vpid" >/dev/null 2>&1
  out=$(wrk -t1 -c8 -d8s "http://127.0.0.1:$vp/api/items")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  run=$(dump run$r)
  callgrind_control -z "$vpid" >/dev/null 2>&1
  sleep 8
  idle=$(dump idle$r)
  echo "$label round $r: $n requests, $(( (run - idle) / n )) Ir/request (run $run, idle $idle)"
done
kill "$vpid" "$ngpid" 2>/dev/null || true
wait 2>/dev/null || true
