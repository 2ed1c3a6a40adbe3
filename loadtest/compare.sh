#!/usr/bin/env bash
# Throughput and latency of wakegate against nginx, both proxying to the same always-on
# upstream, and of that upstream hit directly. See loadtest/README.md.
#
#   loadtest/compare.sh                  # one round, 10 s per run
#   ROUNDS=3 DURATION=30s loadtest/compare.sh
#
# Needs wrk and nginx on PATH (Debian: apt-get install -y wrk nginx-light).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"

ROUNDS="${ROUNDS:-1}"
DURATION="${DURATION:-10s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
WARMUP="${WARMUP:-2s}"
# Each upstream candidate is measured directly for this long; the faster one is used.
PROBE="${PROBE:-5s}"
# Fixed ports on 127.0.0.1 (nginx cannot be told to pick one and report it).
DEMO_PORT="${DEMO_PORT:-18101}"
STATIC_PORT="${STATIC_PORT:-18102}"
NGINX_PORT="${NGINX_PORT:-18103}"
WAKEGATE_PORT="${WAKEGATE_PORT:-18104}"
WAKEGATE_ADMIN_PORT="${WAKEGATE_ADMIN_PORT:-18105}"
# Optional: another wakegate binary (e.g. a build of main) measured alongside as "baseline",
# interleaved with the others, on these ports.
BASELINE_BIN="${BASELINE_BIN:-}"
BASELINE_PORT="${BASELINE_PORT:-18106}"
BASELINE_ADMIN_PORT="${BASELINE_ADMIN_PORT:-18107}"
export RUST_LOG="${RUST_LOG:-warn}"

wrk_args=(-t"$THREADS" -c"$CONNECTIONS" --latency)
for tool in wrk nginx cargo; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool is not on PATH" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/wakegate-loadtest.XXXXXX")"
pids=()
# The process started under each name, whose CPU time is measured.
declare -A pid_of
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '>> %s\n' "$*" >&2; }

listening() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_free() {
    local port
    for port in "$@"; do
        if listening "$port"; then
            echo "compare.sh: port $port on 127.0.0.1 is in use; set the *_PORT variables" >&2
            exit 1
        fi
    done
}

wait_listening() {
    local port="$1" name="$2" pid="$3"
    for _ in $(seq 100); do
        listening "$port" && return 0
        kill -0 "$pid" 2>/dev/null || { echo "compare.sh: $name exited; see $work/$name.log" >&2; cat "$work/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "compare.sh: $name did not listen on $port within 10 s" >&2
    exit 1
}

# start NAME PORT COMMAND...: runs COMMAND in the background, logging to $work/NAME.log.
start() {
    local name="$1" port="$2"
    shift 2
    "$@" >"$work/$name.log" 2>&1 &
    pids+=("$!")
    pid_of[$name]="$!"
    wait_listening "$port" "$name" "$!"
}

# cpu_ticks PID: user plus system CPU time of PID and of its child processes (nginx's
# workers), in clock ticks.
cpu_ticks() {
    local pid="$1" child stats=("/proc/$1/stat")
    for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null || true); do
        stats+=("/proc/$child/stat")
    done
    # Fields after "pid (comm) ": utime and stime are the 12th and 13th.
    { cat "${stats[@]}" 2>/dev/null || true; } |
        awk '{ sub(/^.*\) /, ""); ticks += $12 + $13 } END { print ticks + 0 }'
}

# nginx_conf NAME SERVER_BLOCK: an nginx prefix directory under $work, its config file printed.
nginx_conf() {
    local name="$1" server="$2" dir="$work/$1"
    mkdir -p "$dir"
    local user=""
    if [ "$(id -u)" = 0 ]; then
        # Workers drop to nobody; they must be able to reach the prefix directory.
        chmod 755 "$work" "$dir"
        user="user nobody nogroup;"
    fi
    cat >"$dir/nginx.conf" <<EOF
$user
worker_processes 2;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # wrk keeps its connections for the whole run, as wakegate lets it.
    keepalive_requests 1000000;
    keepalive_timeout 60s;
$server
}
EOF
    echo "$dir/nginx.conf"
}

start_nginx() {
    local name="$1" port="$2" conf="$3"
    start "$name" "$port" nginx -p "$work/$name" -e "$work/$name/error.log" -c "$conf"
}

# wrk in the background, so that a signal to this script stops everything at once.
wrk_into() {
    local out="$1"
    shift
    wrk "${wrk_args[@]}" "$@" >"$out" &
    pids+=("$!")
    wait "$!"
    unset 'pids[-1]'
}

# run_wrk NAME URL DURATION FILE [PID]: one wrk run; appends "name<TAB>req/s<TAB>avg ms<TAB>
# p99 ms<TAB>errors<TAB>CPU seconds per 100k requests of PID (and its children)" to FILE and
# prints it on stderr.
run_wrk() {
    local name="$1" url="$2" duration="$3" file="$4" pid="${5:-}" out="$work/wrk.txt"
    local before=0 after=0
    [ -n "$pid" ] && before="$(cpu_ticks "$pid")"
    wrk_into "$out" -d"$duration" "$url"
    [ -n "$pid" ] && after="$(cpu_ticks "$pid")"
    awk -v name="$name" -v ticks="$((after - before))" -v hz="$(getconf CLK_TCK)" -v measured="${pid:+1}" '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/)  return substr(v, 1, length(v) - 1) * 1000
            return v + 0
        }
        $1 == "Latency" && avg == "" { avg = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        $1 == "Requests/sec:" { rps = $2 }
        $2 == "requests" && $3 == "in" { requests = $1 }
        /Socket errors:/ { gsub(",", ""); errors += $4 + $6 + $8 + $10 }
        /Non-2xx or 3xx responses:/ { errors += $NF }
        END {
            if (rps == "") { print "compare.sh: no result from wrk for " name > "/dev/stderr"; exit 1 }
            cpu = measured && requests > 0 ? sprintf("%.3f", ticks / hz / requests * 100000) : "-"
            printf "%s\t%.0f\t%.3f\t%.3f\t%d\t%s\n", name, rps, avg, p99, errors, cpu
        }' "$out" >>"$file"
    tail -n 1 "$file" >&2
}

# Anything else busy on the machine skews the numbers; the report shows it.
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
log "building wakegate (release)"
(cd "$root" && cargo build --release --quiet --bin wakegate)
bin="$root/target/release/wakegate"

ensure_free "$DEMO_PORT" "$STATIC_PORT" "$NGINX_PORT" "$WAKEGATE_PORT" "$WAKEGATE_ADMIN_PORT"
targets=(direct nginx wakegate)
if [ -n "$BASELINE_BIN" ]; then
    ensure_free "$BASELINE_PORT" "$BASELINE_ADMIN_PORT"
    targets+=(baseline)
fi

# Two upstream candidates; the faster one directly is the upstream for both proxies, so the
# upstream limits the proxies as little as possible.
log "starting upstream candidates: demo backend on $DEMO_PORT, static nginx on $STATIC_PORT"
start demo "$DEMO_PORT" "$bin" demo-backend --port "$DEMO_PORT"
# A body of the demo backend's size, so both candidates send the same bytes.
static_conf="$(nginx_conf static "
    server {
        listen 127.0.0.1:$STATIC_PORT reuseport;
        location / {
            default_type text/plain;
            return 200 'hello from the static nginx upstream (port $STATIC_PORT)\n';
        }
    }")"
start_nginx static "$STATIC_PORT" "$static_conf"

log "probing each upstream candidate directly for $PROBE"
run_wrk demo "http://127.0.0.1:$DEMO_PORT/" "$PROBE" "$work/probe.tsv"
run_wrk static "http://127.0.0.1:$STATIC_PORT/" "$PROBE" "$work/probe.tsv"
demo_rps="$(awk -F'\t' '$1 == "demo" { print $2 }' "$work/probe.tsv")"
static_rps="$(awk -F'\t' '$1 == "static" { print $2 }' "$work/probe.tsv")"
if [ "$static_rps" -gt "$demo_rps" ]; then
    upstream="static nginx"
    upstream_port="$STATIC_PORT"
else
    upstream="demo backend"
    upstream_port="$DEMO_PORT"
fi
log "demo backend: $demo_rps req/s, static nginx: $static_rps req/s -> upstream: $upstream"

proxy_conf="$(nginx_conf proxy "
    upstream backend {
        server 127.0.0.1:$upstream_port;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT reuseport;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }")"
log "starting nginx proxy on $NGINX_PORT"
start_nginx proxy "$NGINX_PORT" "$proxy_conf"

# start_wakegate NAME BINARY PORT ADMIN_PORT
start_wakegate() {
    local name="$1" binary="$2" port="$3" admin="$4"
    cat >"$work/$name.toml" <<EOF
[listen]
proxy = "127.0.0.1:$port"
admin = "127.0.0.1:$admin"

[[target]]
name = "upstream"
hosts = ["*"]
upstream = "127.0.0.1:$upstream_port"
EOF
    log "starting $name ($binary) on $port"
    start "$name" "$port" "$binary" run --config "$work/$name.toml"
}
start_wakegate wakegate "$bin" "$WAKEGATE_PORT" "$WAKEGATE_ADMIN_PORT"
if [ -n "$BASELINE_BIN" ]; then
    start_wakegate baseline "$BASELINE_BIN" "$BASELINE_PORT" "$BASELINE_ADMIN_PORT"
fi

declare -A url_of=(
    [direct]="http://127.0.0.1:$upstream_port/"
    [nginx]="http://127.0.0.1:$NGINX_PORT/"
    [wakegate]="http://127.0.0.1:$WAKEGATE_PORT/"
    [baseline]="http://127.0.0.1:$BASELINE_PORT/"
)
# Whose CPU time counts for each target: the upstream itself for direct, else the proxy.
if [ "$upstream_port" = "$STATIC_PORT" ]; then upstream_name=static; else upstream_name=demo; fi
declare -A measured_pid=(
    [direct]="${pid_of[$upstream_name]}"
    [nginx]="${pid_of[proxy]}"
    [wakegate]="${pid_of[wakegate]}"
    [baseline]="${pid_of[baseline]:-}"
)

log "warming up each for $WARMUP"
for name in "${targets[@]}"; do
    wrk_into /dev/null -d"$WARMUP" "${url_of[$name]}"
done

for round in $(seq "$ROUNDS"); do
    for name in "${targets[@]}"; do
        log "round $round/$ROUNDS: $name (${url_of[$name]}), $DURATION"
        run_wrk "$name" "${url_of[$name]}" "$DURATION" "$work/results.tsv" "${measured_pid[$name]}"
    done
done

# The median of each column per target over the rounds, as a Markdown table.
report() {
    echo "wakegate $(cd "$root" && git describe --always --dirty 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), load average before: $load_before"
    echo
    echo "upstream: $upstream on 127.0.0.1:$upstream_port (probed directly: demo backend $demo_rps req/s, static nginx $static_rps req/s)"
    echo "load: wrk ${wrk_args[*]} -d$DURATION, $ROUNDS round(s), interleaved; medians over the rounds"
    echo
    echo "CPU: user + system seconds of the proxy (nginx: master and workers; direct: the upstream) per 100,000 requests"
    echo
    echo "| target | req/s | avg latency | p99 latency | errors | req/s vs nginx | CPU s / 100k req | CPU vs nginx |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' -v targets="${targets[*]}" '
        function median(list,    n, a, i, j, t) {
            n = split(list, a, " ")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        { rps[$1] = rps[$1] " " $2; avg[$1] = avg[$1] " " $3; p99[$1] = p99[$1] " " $4; err[$1] += $5; cpu[$1] = cpu[$1] " " $6 }
        END {
            nginx = median(rps["nginx"])
            nginx_cpu = median(cpu["nginx"])
            n = split(targets, order, " ")
            for (k = 1; k <= n; k++) {
                name = order[k]
                c = median(cpu[name])
                printf "| %s | %.0f | %.3f ms | %.3f ms | %d | %.2f | %.3f | %.2f |\n", name, median(rps[name]), median(avg[name]), median(p99[name]), err[name], median(rps[name]) / nginx, c, (nginx_cpu > 0 ? c / nginx_cpu : 0)
            }
        }' "$work/results.tsv"
}

mkdir -p "$root/loadtest/results"
result="$root/loadtest/results/compare-$(date -u +%Y%m%dT%H%M%SZ).md"
report | tee "$result"
log "written to ${result#"$root"/}"
