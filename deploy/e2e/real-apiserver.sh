#!/usr/bin/env bash
# The real wakegate binary against a real kube-apiserver 1.20 (+ etcd), authenticated as the
# ServiceAccount that deploy/base/rbac.yaml binds. See README.md next to this file.
#
#   KREAL=<dir prepared by the kube-apiserver setup.sh> [KREAL_PORT=6443] [KREAL_ETCD_PORT=2379] \
#   [KREAL_ETCD_PEER_PORT=2380] [WAKEGATE=target/debug/wakegate] [E2E_WORK=<dir>] \
#   deploy/e2e/real-apiserver.sh
#
# It starts etcd (the KREAL start-apiserver.sh) and its own kube-apiserver process (the same flags
# as start-apiserver.sh plus an audit log), on a FRESH cluster: $KREAL/etcd-data is deleted first,
# and the script refuses to run while that KREAL's etcd or apiserver runs or its ports are taken.
# Everything it starts is stopped on exit. Output: PASS/FAIL/INFO lines, exit status 1 if any
# FAIL. Logs (wakegate.log, audit.log, apiserver.log, ...) stay in $E2E_WORK.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
: "${KREAL:?set KREAL to the directory prepared by the kube-apiserver setup.sh}"
KREAL=$(cd "$KREAL" && pwd)
export KREAL
export KREAL_PORT=${KREAL_PORT:-6443}
export KREAL_ETCD_PORT=${KREAL_ETCD_PORT:-2379}
export KREAL_ETCD_PEER_PORT=${KREAL_ETCD_PEER_PORT:-2380}
WAKEGATE=${WAKEGATE:-$REPO/target/debug/wakegate}
WORK=${E2E_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/wakegate-e2e.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export KUBECONFIG=$KREAL/admin.kubeconfig   # kubectl and eps.sh act as admin; wakegate does not
SA_USER=system:serviceaccount:wakegate:wakegate
WG_LOG=$WORK/wakegate.log
AUDIT=$WORK/audit.log

# ---------------------------------------------------------------------------------------------
# helpers
STEP=setup
PASSES=0
FAILS=0
pass() { PASSES=$((PASSES + 1)); echo "PASS [$STEP] $*"; }
fail() { FAILS=$((FAILS + 1)); echo "FAIL [$STEP] $*"; }
info() { echo "INFO [$STEP] $*"; }
die() { fail "$*"; exit 1; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# wait_for SECONDS COMMAND...: polls every 0.2 s; status 0 as soon as COMMAND succeeds
wait_for() {
  local until; until=$(awk -v n="$(now)" -v t="$1" 'BEGIN { printf "%.3f", n + t }'); shift
  while :; do
    "$@" && return 0
    awk -v n="$(now)" -v u="$until" 'BEGIN { exit !(n >= u) }' && return 1
    sleep 0.2
  done
}
k() { kubectl "$@"; }
USED_PORTS=" "
pick_port() {  # pick_port VAR: a free loopback port not picked before, into VAR
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    case $USED_PORTS in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then USED_PORTS="$USED_PORTS$p "; printf -v "$1" %s "$p"; return 0; fi
  done
  die "no free port found"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
alive() { [ -f "$KREAL/$1.pid" ] && kill -0 "$(cat "$KREAL/$1.pid")" 2>/dev/null; }

# wakegate's JSON log lines (from line $2 on) whose message is $1, compact
wg_lines() { tail -n +"${2:-1}" "$WG_LOG" | jq -cR --arg m "$1" 'fromjson? | select(.message == $m)'; }
wg_mark() { echo $(($(wc -l < "$WG_LOG") + 1)); }
targets() { curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/targets"; }
target_json() { targets | jq -c --arg ns "$1" --arg n "$2" '.targets[] | select(.namespace == $ns and .name == $n)'; }
has_target() { [ -n "$(target_json "$1" "$2")" ]; }
metric() { curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
replicas() { k -n "$1" get deploy "$2" -o jsonpath='{.spec.replicas}' 2>/dev/null; }
replicas_is() { [ "$(replicas "$1" "$2")" = "$3" ]; }
# audit events of wakegate's ServiceAccount, one per request (its last stage), as compact JSON.
# A watch still open, or cut by a killed API server, has only its RequestReceived stage (no
# responseStatus): kube-apiserver 1.20 writes a watch's ResponseStarted only when it ends.
sa_audit() {
  jq -cR --arg u "$SA_USER" 'fromjson? | select(.user.username == $u)' "$AUDIT" |
    jq -cs 'def rank: {"RequestReceived": 0, "ResponseStarted": 1, "ResponseComplete": 2, "Panic": 3}[.stage];
      group_by(.auditID) | map(max_by(rank)) | sort_by(.requestReceivedTimestamp) | .[]'
}
# events.k8s.io Events about $1/$2 (namespace, regarding name), optionally of reason $3
events_of() {
  k get events.events.k8s.io -n "$1" -o json 2>/dev/null |
    jq -c --arg n "$2" --arg r "${3:-}" '.items[] | select(.regarding.name == $n and ($r == "" or .reason == $r))'
}
has_event() { [ -n "$(events_of "$@")" ]; }
# req HOST [PATH] [MAX_SECONDS] -> prints "CODE SECONDS"; headers and body in $WORK/last.{hdr,body}
req() {
  curl -s -o "$WORK/last.body" -D "$WORK/last.hdr" -w '%{http_code} %{time_total}' \
    --max-time "${3:-30}" -H "Host: $1" "http://127.0.0.1:$PROXY_PORT${2:-/}"
}

BACKEND_PIDS=()
start_backend() {  # start_backend PORT: a "pod" on 127.0.0.1:PORT
  "$WAKEGATE" demo-backend --port "$1" > "$WORK/backend-$1.log" 2>&1 &
  BACKEND_PIDS+=($!)
  wait_for 10 port_open "$1" || die "demo backend on port $1 did not listen"
}
stop_backend() {  # stop_backend PORT
  local pid
  for pid in "${BACKEND_PIDS[@]}"; do
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--port $1 "; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; fi
  done
}
ready_eps() { "$KREAL/eps.sh" "$1" "$2" http "$3" '[{"addresses":["127.0.0.1"],"conditions":{"ready":true,"serving":true,"terminating":false}}]'; }
empty_eps() { "$KREAL/eps.sh" "$1" "$2" http "$3" '[]'; }

deployment() {  # deployment NS NAME REPLICAS: manifest on stdout
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: $2, namespace: $1, labels: {app: $2}}
spec:
  replicas: $3
  selector: {matchLabels: {app: $2}}
  template:
    metadata: {labels: {app: $2}}
    spec:
      containers: [{name: app, image: "registry.invalid/demo:1", ports: [{name: http, containerPort: 8080}]}]
YAML
}
service() {  # service NS NAME KEY=VALUE...: an opted-in Service (JSON) on stdout
  local ns=$1 name=$2; shift 2
  jq -n --arg ns "$ns" --arg name "$name" '{
    apiVersion: "v1", kind: "Service",
    metadata: {name: $name, namespace: $ns,
      annotations: ({"wakegate.io/enabled": "true"} + ([$ARGS.positional[] | capture("^(?<k>[^=]+)=(?<v>.*)$"; "s") | {(.k): .v}] | add // {}))},
    spec: {selector: {app: $name}, ports: [{name: "http", port: 80, targetPort: "http"}]}}' --args "$@"
}

APISERVER_PID=
start_apiserver() {  # the flags of $KREAL/start-apiserver.sh, plus an audit log of every request
  "$KREAL/bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$KREAL_ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$KREAL_PORT" --insecure-port=0 \
    --cert-dir="$KREAL/certs" --tls-cert-file="$KREAL/certs/apiserver.crt" --tls-private-key-file="$KREAL/certs/apiserver.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$KREAL/sa.pub" \
    --service-account-signing-key-file="$KREAL/sa.key" --api-audiences=https://kubernetes.default.svc \
    --authorization-mode=RBAC --token-auth-file="$KREAL/tokens.csv" \
    --enable-admission-plugins=NamespaceLifecycle,ServiceAccount \
    --disable-admission-plugins=DefaultStorageClass,PersistentVolumeClaimResize,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,StorageObjectInUseProtection,Priority,RuntimeClass,CertificateApproval,CertificateSigning,CertificateSubjectRestriction,DefaultIngressClass,TaintNodesByCondition,LimitRanger \
    --endpoint-reconciler-type=none --allow-privileged=true \
    --runtime-config=discovery.k8s.io/v1beta1=false \
    --audit-policy-file="$WORK/audit-policy.yaml" --audit-log-path="$AUDIT" --audit-log-maxsize=0 \
    >> "$WORK/apiserver.log" 2>&1 &
  APISERVER_PID=$!
  echo "$APISERVER_PID" > "$KREAL/apiserver.pid"
  local tok started; tok=$(head -1 "$KREAL/tokens.csv" | cut -d, -f1); started=$(date -u +%FT%T.%6NZ)
  apiserver_ready() {
    curl -s --max-time 2 --cacert "$KREAL/certs/ca.crt" -H "Authorization: Bearer $tok" \
      "https://127.0.0.1:$KREAL_PORT/readyz" 2>/dev/null | grep -qx ok
  }
  wait_for 90 apiserver_ready || return 1
  echo "$started $(date -u +%FT%T.%6NZ)" >> "$WORK/apiserver-starts.txt"   # from process start to /readyz ok
}
# stop_apiserver [GRACE]: SIGTERM, then SIGKILL after GRACE seconds (default 15). kube-apiserver 1.20
# stops listening at once on SIGTERM but keeps open watch streams until they end (up to 60 s).
stop_apiserver() {
  [ -n "$APISERVER_PID" ] || return 0
  kill "$APISERVER_PID" 2>/dev/null
  for _ in $(seq 1 $((${1:-15} * 4))); do kill -0 "$APISERVER_PID" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$APISERVER_PID" 2>/dev/null && info "kube-apiserver still running ${1:-15} s after SIGTERM: SIGKILL"
  kill -9 "$APISERVER_PID" 2>/dev/null
  wait "$APISERVER_PID" 2>/dev/null
  APISERVER_PID=
  rm -f "$KREAL/apiserver.pid"
}

WAKEGATE_PID=
TRAFFIC_PID=
CURL_PID=
ETCD_STARTED=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "$TRAFFIC_PID" "$CURL_PID"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
  if [ -n "$WAKEGATE_PID" ]; then
    kill "$WAKEGATE_PID" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$WAKEGATE_PID" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$WAKEGATE_PID" 2>/dev/null
  fi
  for p in "${BACKEND_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  stop_apiserver
  [ -n "$ETCD_STARTED" ] && "$KREAL/stop-apiserver.sh" > /dev/null
  wait 2>/dev/null
  echo "logs: $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# set-up: a fresh cluster, wakegate's RBAC, a ServiceAccount kubeconfig, wakegate
for tool in kubectl curl jq etcd etcdctl awk; do command -v "$tool" > /dev/null || die "$tool is not on PATH"; done
for f in bin/kube-apiserver start-apiserver.sh stop-apiserver.sh eps.sh sa-kubeconfig.sh admin.kubeconfig manifests/eps-crd.yaml; do
  [ -e "$KREAL/$f" ] || die "$KREAL/$f is missing: run the kube-apiserver setup.sh with KREAL=$KREAL first"
done
[ -x "$WAKEGATE" ] || die "no wakegate binary at $WAKEGATE (cargo build --bin wakegate, or set WAKEGATE)"
grep -q "127.0.0.1:$KREAL_PORT" "$KREAL/admin.kubeconfig" ||
  die "$KREAL/admin.kubeconfig is not for port $KREAL_PORT: rerun setup.sh with the same KREAL_PORT"
alive etcd && die "an etcd of $KREAL runs already (pid $(cat "$KREAL/etcd.pid")); stop it first"
alive apiserver && die "a kube-apiserver of $KREAL runs already (pid $(cat "$KREAL/apiserver.pid")); stop it first"
for p in "$KREAL_PORT" "$KREAL_ETCD_PORT" "$KREAL_ETCD_PEER_PORT"; do
  port_open "$p" && die "port $p is in use: choose other KREAL_PORT / KREAL_ETCD_PORT / KREAL_ETCD_PEER_PORT"
done
info "work dir $WORK, wakegate $WAKEGATE ($("$WAKEGATE" --version 2>&1))"
info "kube-apiserver $("$KREAL/bin/kube-apiserver" --version 2>&1), kubectl $(kubectl version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion)"

rm -rf "$KREAL/etcd-data"
ETCD_STARTED=1
"$KREAL/start-apiserver.sh" etcd > "$WORK/etcd-start.log" 2>&1 || die "etcd did not start: $(cat "$WORK/etcd-start.log")"
cat > "$WORK/audit-policy.yaml" <<'YAML'
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: Metadata
YAML
t0=$(now)
start_apiserver || die "kube-apiserver not ready (see $WORK/apiserver.log)"
info "kube-apiserver ready in $(since "$t0") s on 127.0.0.1:$KREAL_PORT (audit log $AUDIT)"
k apply -f "$KREAL/manifests/eps-crd.yaml" > /dev/null &&
  k wait --for condition=established --timeout=60s crd/endpointslices.discovery.k8s.io > /dev/null ||
  die "EndpointSlice CRD not established"

# deploy/base rendered, then only the namespace, the ServiceAccount and the RBAC objects
k kustomize "$REPO/deploy/base" |
  awk 'BEGIN { RS = "\n---\n"; ORS = "\n---\n" }
       /(^|\n)kind: (Namespace|ServiceAccount|ClusterRole|ClusterRoleBinding|Role|RoleBinding)\n/' > "$WORK/rbac.yaml"
applied=$(k apply -f "$WORK/rbac.yaml" 2>&1) || die "applying the RBAC of deploy/base failed: $applied"
info "applied from deploy/base: $(echo "$applied" | awk '{ print $1 }' | paste -sd' ')"
"$KREAL/sa-kubeconfig.sh" wakegate wakegate "$WORK/sa.kubeconfig" 7200 > /dev/null || die "no ServiceAccount token"

[ -n "${PROXY_PORT:-}" ] || pick_port PROXY_PORT
[ -n "${ADMIN_PORT:-}" ] || pick_port ADMIN_PORT
cat > "$WORK/wakegate.toml" <<TOML
drain_timeout = "2s"

[listen]
proxy = "127.0.0.1:$PROXY_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
workers = 1

[kubernetes]
namespaces = []
kubeconfig = "$WORK/sa.kubeconfig"
autoscaler = "internal"
lease = { namespace = "wakegate", name = "wakegate" }
wildcard_namespaces = ["edge"]
TOML
"$WAKEGATE" check --config "$WORK/wakegate.toml" > /dev/null || die "wakegate check rejects $WORK/wakegate.toml"
RUST_LOG=${WAKEGATE_RUST_LOG:-info,wakegate=debug} POD_NAME=wakegate-e2e \
  "$WAKEGATE" run --config "$WORK/wakegate.toml" --log-format json > "$WG_LOG" 2>&1 &
WAKEGATE_PID=$!
wg_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$ADMIN_PORT/readyz")" = 200 ]; }
t0=$(now)
wait_for 30 wg_ready || die "wakegate /readyz not 200 within 30 s (see $WG_LOG)"
info "wakegate ready (first sync) in $(since "$t0") s: proxy 127.0.0.1:$PROXY_PORT, admin 127.0.0.1:$ADMIN_PORT"
is_leader() { [ "$(metric wakegate_leader)" = 1 ]; }
check "wakegate holds the Lease wakegate/wakegate (wakegate_leader 1)" wait_for 20 is_leader

# ---------------------------------------------------------------------------------------------
STEP=1-discovery
k create namespace demo > /dev/null
deployment demo hello 0 | k create -f - > /dev/null
t0=$(now)
service demo hello wakegate.io/hosts=hello.example.com wakegate.io/port=http \
  wakegate.io/idle-timeout=5s wakegate.io/scale-down-delay=1s | k create -f - > /dev/null
if wait_for 10 has_target demo hello; then
  pass "demo/hello in /targets $(since "$t0") s after the Service was created: $(target_json demo hello | jq -c '{state, instances, replicas, refused_routes}')"
else
  fail "demo/hello not in /targets within 10 s: $(targets | jq -c '[.targets[] | .namespace + "/" + .name]')"
fi

# ---------------------------------------------------------------------------------------------
STEP=2-wake
pick_port B1
mark=$(wg_mark)
t0=$(now)
{ req hello.example.com / 60; echo " $(now)"; } > "$WORK/wake.out" &
CURL_PID=$!
if wait_for 10 replicas_is demo hello 1; then
  pass "Deployment demo/hello at replicas 1 $(since "$t0") s after the request"
else
  fail "Deployment demo/hello not at 1 within 10 s (replicas=$(replicas demo hello))"
fi
pending=$(target_json demo hello | jq .pending)
if kill -0 "$CURL_PID" 2>/dev/null && [ "$pending" = 1 ]; then
  pass "the request is held (pending=$pending) while no endpoint is ready"
else
  fail "the request is not held: pending=$pending, curl finished: $(cat "$WORK/wake.out")"
fi
start_backend "$B1"
ready_eps demo hello "$B1"
wait "$CURL_PID"; CURL_PID=
read -r code secs ended < "$WORK/wake.out"
# from the API server receiving the EndpointSlice write (audit) to the response's end
written=$(jq -cR 'fromjson? | select(.stage == "ResponseComplete" and .verb == "patch" and .objectRef.resource == "endpointslices" and .objectRef.name == "hello-abc12") | .requestReceivedTimestamp' "$AUDIT" | tail -1 | tr -d '"')
after=$(awk -v a="$(date -u -d "$written" +%s.%N)" -v b="$ended" 'BEGIN { printf "%.3f", b - a }')
cold=$(tr -d '\r' < "$WORK/last.hdr" | awk -F': ' 'tolower($1) == "x-wakegate-cold-start" { print $2 }')
if [ "$code" = 200 ] && [ "$cold" = true ] && grep -q "port $B1" "$WORK/last.body"; then
  pass "held request answered 200 with x-wakegate-cold-start: true by the backend on $B1, ${after} s after the API server received the ready EndpointSlice (${secs} s in all)"
else
  fail "held request: code=$code cold-start=$cold body=$(head -c 200 "$WORK/last.body")"
fi
info "wakegate log: $(wg_lines scaled "$mark" | head -3 | paste -sd' ')"
over=$(wg_lines "taking spec.replicas over from its last updater" "$mark")
[ -n "$over" ] && info "wakegate log: $over"
# the /scale PATCHes wakegate sent for the wake, as the API server recorded them
patches=$(sa_audit | jq -c 'select(.verb == "patch" and .objectRef.resource == "deployments" and .objectRef.subresource == "scale" and .objectRef.name == "hello") | {uri: .requestURI, code: .responseStatus.code}')
info "audit: PATCH deployments/hello/scale by $SA_USER: $(echo "$patches" | paste -sd' ')"
first=$(echo "$patches" | head -1)
forced_unprovoked=$(echo "$patches" | jq -s '[range(0; length) as $i | select(.[$i].uri | test("force=true")) | select($i == 0 or .[$i - 1].code != 409)] | length')
if [ -n "$first" ] && ! echo "$first" | jq -e '.uri | test("force=true")' > /dev/null && echo "$first" | jq -e '.uri | test("fieldManager=wakegate")' > /dev/null; then
  pass "the first PATCH is a server-side apply with fieldManager=wakegate and no force=true"
else
  fail "the first PATCH of /scale: $first"
fi
if [ "$forced_unprovoked" = 0 ]; then
  pass "force=true only ever right after a 409 Conflict ($(echo "$patches" | grep -c 'force=true') forced of $(echo "$patches" | grep -c .) PATCHes)"
else
  fail "$forced_unprovoked PATCH(es) with force=true not preceded by a 409"
fi

# ---------------------------------------------------------------------------------------------
STEP=3-kubectl-scale
mark=$(wg_mark)
t0=$(now)
k -n demo scale deploy hello --replicas=3 > /dev/null
if wait_for 30 replicas_is demo hello 0; then
  pass "Deployment demo/hello back at 0 $(since "$t0") s after kubectl scale --replicas=3"
else
  fail "Deployment demo/hello not at 0 within 30 s (replicas=$(replicas demo hello))"
fi
scaled=$(wg_lines scaled "$mark" | jq -c 'select(.service == "hello")')
info "wakegate log since kubectl scale: $(echo "$scaled" | paste -sd' ')"
first=$(echo "$scaled" | head -1)
if echo "$first" | jq -e '.from == 3' > /dev/null && echo "$scaled" | tail -1 | jq -e '.to == 0' > /dev/null; then
  pass "first \"scaled\" line after kubectl scale has \"from\":3, last has \"to\":0 ($(echo "$scaled" | jq -r '"\(.from)->\(.to)"' | paste -sd' '))"
else
  fail "\"scaled\" lines after kubectl scale: $(echo "$scaled" | jq -r '"\(.from)->\(.to)"' | paste -sd' ')"
fi
# ("scaling" lines carry the key "target" twice, the target's name and the module: jq keeps the
# module, so they are picked by their text)
decisions=$(tail -n +"$mark" "$WG_LOG" | grep -F '"message":"scaling","target":"hello"' | jq -c '{from, to, ready, stable, idle, demand}')
[ -n "$decisions" ] && info "autoscaler decisions: $(echo "$decisions" | paste -sd' ')"
# the kubelet's part: the pod goes away
empty_eps demo hello "$B1"
stop_backend "$B1"
# the same on an idle target at zero: the count kubectl set is what wakegate starts from
sleep 1
mark=$(wg_mark)
t0=$(now)
k -n demo scale deploy hello --replicas=3 > /dev/null
if wait_for 15 replicas_is demo hello 0; then
  pass "idle at zero, kubectl scale --replicas=3: back at 0 in $(since "$t0") s"
else
  fail "idle at zero, kubectl scale --replicas=3: not back at 0 within 15 s (replicas=$(replicas demo hello))"
fi
scaled=$(wg_lines scaled "$mark" | jq -c 'select(.service == "hello")')
info "wakegate log: $(echo "$scaled" | jq -c 'del(.timestamp, .target)' | paste -sd' ')"
info "wakegate log: $(tail -n +"$mark" "$WG_LOG" | grep -F '"message":"scaling","target":"hello"' | jq -c '{from, to, ready, idle, demand}' | paste -sd' ')"
check "the \"scaled\" line at idle has \"from\":3,\"to\":0" [ "$(echo "$scaled" | jq -c '[.from, .to]' | paste -sd' ')" = "[3,0]" ]

# ---------------------------------------------------------------------------------------------
STEP=4-gitops
mark=$(wg_mark)
owners() { k -n demo get deploy hello --show-managed-fields -o json | jq -c '[.metadata.managedFields[] | select(.fieldsV1["f:spec"]["f:replicas"] != null) | "\(.manager)(\(.operation))"]'; }
info "owners of spec.replicas before: $(owners)"
t0=$(now)
if out=$(deployment demo hello 2 | k apply --server-side --field-manager=gitops -f - 2>&1); then
  info "gitops apply (no force): $out"
else
  info "gitops apply without --force-conflicts refused: $(echo "$out" | head -1)"
  out=$(deployment demo hello 2 | k apply --server-side --force-conflicts --field-manager=gitops -f - 2>&1)
  info "gitops apply --force-conflicts: $out"
fi
info "owners of spec.replicas after the gitops apply: $(owners), replicas=$(replicas demo hello)"
settled() { [ "$(replicas demo hello)" = 0 ] || has_event demo hello ScaleConflict; }
if wait_for 20 settled; then
  pass "wakegate acted within $(since "$t0") s: replicas=$(replicas demo hello), ScaleConflict Events: $(events_of demo hello ScaleConflict | grep -c .)"
else
  fail "neither scaled to 0 nor a ScaleConflict Event within 20 s (replicas=$(replicas demo hello))"
fi
sleep 1
for m in scaled "taking spec.replicas over from its last updater" "cannot scale; backing off"; do
  lines=$(wg_lines "$m" "$mark" | jq -c 'del(.timestamp, .level, .target, .threadName, .threadId)')
  [ -n "$lines" ] && info "wakegate log: $(echo "$lines" | paste -sd' ')"
done
info "owners of spec.replicas at the end: $(owners), replicas=$(replicas demo hello)"
info "wakegate_kubernetes_scale_conflicts_total: $(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^wakegate_kubernetes_scale_conflicts_total' | paste -sd' ')"
patches=$(sa_audit | jq -r 'select(.verb == "patch" and .objectRef.subresource == "scale" and .objectRef.name == "hello" and .requestReceivedTimestamp >= $t)
  | "\(.requestURI | sub(".*\\?"; "?")) -> \(.responseStatus.code)"' --arg t "$(date -u -d "@${t0%.*}" +%FT%T)")
info "audit: /scale PATCHes since the gitops apply: $(echo "$patches" | paste -sd' ')"

# ---------------------------------------------------------------------------------------------
STEP=5-host-ownership
for ns in team-a team-b edge; do k create namespace "$ns" > /dev/null; done
pick_port PA; pick_port PB
deployment team-a shop 1 | k create -f - > /dev/null
deployment team-b shop 1 | k create -f - > /dev/null
start_backend "$PA"; start_backend "$PB"
ready_eps team-a shop "$PA"; ready_eps team-b shop "$PB"
service team-a shop wakegate.io/hosts=shared.example.com wakegate.io/idle-timeout=10m | k create -f - > /dev/null
sleep 1.2   # creationTimestamp has one-second resolution: make team-b's strictly newer
service team-b shop wakegate.io/hosts=shared.example.com,b-only.example.com wakegate.io/idle-timeout=10m | k create -f - > /dev/null
service team-b catchall 'wakegate.io/hosts=*' | k create -f - > /dev/null
service edge wild 'wakegate.io/hosts=*.edge.example.com' | k create -f - > /dev/null
info "creationTimestamps: team-a/shop $(k -n team-a get svc shop -o jsonpath='{.metadata.creationTimestamp}'), team-b/shop $(k -n team-b get svc shop -o jsonpath='{.metadata.creationTimestamp}')"
all_there() { has_target team-a shop && has_target team-b shop && has_target team-b catchall && has_target edge wild; }
wait_for 10 all_there || fail "not all of team-a/shop team-b/shop team-b/catchall edge/wild in /targets"
refused() { target_json "$1" "$2" | jq -c '.refused_routes'; }
refused_has() { refused "$1" "$2" | jq -e --arg h "$3" --arg r "$4" 'any(.[]; .host == $h and .reason == $r)' > /dev/null; }
check "team-b/shop: refused_routes has shared.example.com (claimed): $(refused team-b shop)" wait_for 5 refused_has team-b shop shared.example.com claimed
check "team-a/shop (older) has no refused route: $(refused team-a shop)" [ "$(refused team-a shop)" = "[]" ]
check "team-b/catchall: refused_routes has * (wildcard): $(refused team-b catchall)" refused_has team-b catchall '*' wildcard
check "edge/wild (*.edge.example.com, edge in wildcard_namespaces) has no refused route: $(refused edge wild)" [ "$(refused edge wild)" = "[]" ]
served_by() { local r; r=$(req "$1" / 10); [ "${r%% *}" = 200 ] && grep -q "port $2" "$WORK/last.body"; }
check "Host shared.example.com is served by team-a's pod (port $PA)" wait_for 5 served_by shared.example.com "$PA"
check "Host b-only.example.com is served by team-b's pod (port $PB): the loser keeps its other routes" wait_for 5 served_by b-only.example.com "$PB"
check "RouteRefused Event on team-b/shop" wait_for 10 has_event team-b shop RouteRefused
check "RouteRefused Event on team-b/catchall" wait_for 10 has_event team-b catchall RouteRefused
info "Events: $( (events_of team-b shop RouteRefused; events_of team-b catchall RouteRefused) | jq -c '{regarding: "\(.regarding.namespace)/\(.regarding.name)", reason, type, note, reportingController, reportingInstance}' | paste -sd' ')"
check "no RouteRefused Event on team-a/shop" [ -z "$(events_of team-a shop RouteRefused)" ]
# the older Service changes (target replaced, claims recomputed): it keeps the host
k -n team-a annotate svc shop wakegate.io/idle-timeout=11m --overwrite > /dev/null
sleep 2
check "after team-a/shop changed, shared.example.com is still team-a's" wait_for 5 served_by shared.example.com "$PA"
check "... and still refused to team-b/shop" refused_has team-b shop shared.example.com claimed
info "wakegate log: $(wg_lines "route refused" | jq -c '{namespace, service, route}' | paste -sd' ')"
info "wakegate_refused_routes: $(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^wakegate_refused_routes' | paste -sd' ')"

# ---------------------------------------------------------------------------------------------
STEP=6-long-note
long=$(printf 'x%.0s' $(seq 1 600))$(printf 'é%.0s' $(seq 1 300))   # 1,200 bytes
mark=$(wg_mark)
service demo badnote wakegate.io/hosts=badnote.example.com "wakegate.io/idle-timeout=$long" | k create -f - > /dev/null
if wait_for 15 has_event demo badnote InvalidAnnotation; then
  ev=$(events_of demo badnote InvalidAnnotation | head -1)
  bytes=$(echo "$ev" | jq '.note | utf8bytelength')
  if [ "$bytes" -le 1024 ] && echo "$ev" | jq -e '.note | endswith("…")' > /dev/null; then
    pass "InvalidAnnotation Event on demo/badnote, note cut to $bytes bytes (annotation value: ${#long} characters, 1,200 bytes), type $(echo "$ev" | jq -r .type), action $(echo "$ev" | jq -r .action)"
  else
    fail "InvalidAnnotation Event note is $bytes bytes: $(echo "$ev" | jq -c .note | head -c 300)"
  fi
  info "note ends: ...$(echo "$ev" | jq -r .note | tail -c 120)"
else
  fail "no InvalidAnnotation Event on demo/badnote within 15 s"
fi
check "demo/badnote is still a target (a bad tuning value falls back to its default)" has_target demo badnote
info "wakegate log: $(wg_lines "invalid annotation: default used" "$mark" | jq -c '{service, annotation, expected, value_bytes: (.value | utf8bytelength)}' | paste -sd' ')"
errs=$(wg_lines "cannot record the Event" | grep -c .)
check "no \"cannot record the Event\" in wakegate's log so far ($errs)" [ "$errs" = 0 ]
info "wakegate_invalid_annotations_total $(metric wakegate_invalid_annotations_total)"

# ---------------------------------------------------------------------------------------------
STEP=7-missing-deployment
service demo ghost wakegate.io/hosts=ghost.example.com | k create -f - > /dev/null
wait_for 10 has_target demo ghost || fail "demo/ghost not in /targets"
mark=$(wg_mark)
tstart=$(date -u +%FT%T.%6NZ)
t0=$(now)
r=$(req ghost.example.com / 30)
if [ "${r%% *}" = 502 ] && awk -v s="${r#* }" 'BEGIN { exit !(s < 3) }' && grep -q ghost "$WORK/last.body"; then
  pass "request for ghost.example.com: 502 after ${r#* } s: $(head -c 200 "$WORK/last.body" | tr '\n' ' ')"
else
  fail "request for ghost.example.com: $r: $(head -c 200 "$WORK/last.body")"
fi
sleep "$(awk -v s="$(since "$t0")" 'BEGIN { w = 10 - s; print (w > 0 ? w : 0) }')"
window=$(since "$t0")
calls=$(sa_audit | jq -c --arg t "$tstart" 'select(.requestReceivedTimestamp >= $t and .objectRef.name == "ghost" and .objectRef.resource == "deployments") | {verb, sub: .objectRef.subresource, code: .responseStatus.code, at: .requestReceivedTimestamp}')
scale_calls=$(echo "$calls" | jq -c 'select(.sub == "scale")' | grep -c .)
nevents=$(events_of demo ghost | grep -c .)
info "audit, ${window} s from the request: $(echo "$calls" | jq -r '"\(.verb) \(.sub // "-") \(.code) \(.at[11:23])"' | paste -sd',')"
info "Events about demo/ghost: $(events_of demo ghost | jq -c '{reason, note, series: .series.count}' | paste -sd' ')"
info "wakegate log: $(wg_lines "cannot scale; backing off" "$mark" | jq -c 'select((.workload // "") | test("ghost")) | {level, error, retry_in}' | paste -sd' ')"
if [ "$scale_calls" -ge 1 ] && [ "$scale_calls" -le 6 ]; then
  pass "$scale_calls /scale requests for deployment ghost in $window s (backing off, not one per second)"
else
  fail "$scale_calls /scale requests for deployment ghost in $window s"
fi
if [ "$nevents" -ge 1 ] && [ "$nevents" -le 2 ]; then
  pass "$nevents Event(s) about demo/ghost in $window s"
else
  fail "$nevents Events about demo/ghost in $window s"
fi
# the Deployment appears: the next request wakes it without waiting out the back-off
deployment demo ghost 0 | k create -f - > /dev/null
sleep 1
t0=$(now)
req ghost.example.com / 5 > /dev/null &
CURL_PID=$!
if wait_for 5 replicas_is demo ghost 1; then
  pass "once Deployment ghost exists, a request wakes it in $(since "$t0") s"
else
  fail "Deployment ghost not woken within 5 s of a request after it appeared"
fi
wait "$CURL_PID" 2>/dev/null; CURL_PID=

# ---------------------------------------------------------------------------------------------
STEP=9-restart
pick_port B9
start_backend "$B9"
req hello.example.com / 60 > "$WORK/wake9.out" &
CURL_PID=$!
wait_for 10 replicas_is demo hello 1 || fail "hello not woken for the outage part"
ready_eps demo hello "$B9"
wait "$CURL_PID"; CURL_PID=
check "hello warm again: $(cat "$WORK/wake9.out")" [ "$(cut -d' ' -f1 "$WORK/wake9.out")" = 200 ]
traffic() {
  while :; do
    echo "$(date +%s.%N) $(curl -s -o /dev/null -w '%{http_code}' --max-time 3 -H 'Host: hello.example.com' "http://127.0.0.1:$PROXY_PORT/")"
    sleep 0.2
  done
}
traffic > "$WORK/traffic.txt" &
TRAFFIC_PID=$!
sleep 2
mark=$(wg_mark)
tdown=$(now)
stop_apiserver 3
info "kube-apiserver stopped in $(since "$tdown") s (etcd keeps running); starting it again 20 s after the stop"
sleep "$(awk -v s="$(since "$tdown")" 'BEGIN { w = 20 - s; print (w > 0 ? w : 0) }')"
t0=$(now)
start_apiserver || die "kube-apiserver did not come back (see $WORK/apiserver.log)"
tup=$(now)
info "kube-apiserver ready again $(since "$t0") s after its start, $(awk -v a="$tdown" -v b="$tup" 'BEGIN { printf "%.1f", b - a }') s after the stop"
service demo late wakegate.io/hosts=late.example.com | k create -f - > /dev/null
tcreated=$(now)
if wait_for 10 has_target demo late; then
  pass "new Service demo/late in /targets $(since "$tup") s after the API server was ready ($(since "$tcreated") s after its creation)"
else
  fail "demo/late not in /targets within 10 s of its creation ($(since "$tup") s after the API server's return)"
fi
sleep 2
# a watch resumed from before the restart is told "too old resource version" (410 Expired):
# how long after that wakegate relisted, by the audit log
epoch() { date -u -d "$1" +%s.%N; }
relists=""
while read -r e; do
  [ -n "$e" ] || continue
  kind=$(echo "$e" | jq -r .kind); at=$(echo "$e" | jq -r .timestamp)
  resource=$(echo "$kind" | tr '[:upper:]' '[:lower:]')s
  listed=$(sa_audit | jq -r --arg r "$resource" --arg t "$at" 'select(.verb == "list" and .objectRef.resource == $r and .requestReceivedTimestamp > $t) | .requestReceivedTimestamp' | head -1)
  [ -n "$listed" ] && relists="$relists $kind $(awk -v a="$(epoch "$at")" -v b="$(epoch "$listed")" 'BEGIN { printf "%.2f", b - a }') s,"
done <<< "$(tail -n +"$mark" "$WG_LOG" | jq -cR 'fromjson? | select(.message == "watch failed; retrying with backoff" and ((.error // "") | test("too old resource version"))) | {kind, timestamp}')"
info "410 Expired on resuming watches, then the relist came after:${relists:- (no Expired seen)}"
kill "$TRAFFIC_PID" 2>/dev/null; wait "$TRAFFIC_PID" 2>/dev/null; TRAFFIC_PID=
total=$(grep -c . "$WORK/traffic.txt")
during=$(awk -v a="$tdown" -v b="$tup" '$1 >= a && $1 <= b' "$WORK/traffic.txt" | grep -c .)
bad=$(awk '$2 != 200' "$WORK/traffic.txt")
if [ -z "$bad" ] && [ "$during" -gt 0 ]; then
  pass "warm traffic to hello: $total requests all 200, $during of them while the API server was down"
else
  fail "warm traffic to hello: $total requests, not 200: $(echo "$bad" | awk '{ print $2 }' | sort | uniq -c | paste -sd' ')"
fi
info "wakegate log during/after the outage: $(tail -n +"$mark" "$WG_LOG" | jq -cR 'fromjson? | select(.level == "WARN" or .level == "ERROR" or (.message | test("leader|synced|scal"))) | .message' | sort | uniq -c | sed 's/^ *//' | paste -sd',')"
check "hello still at replicas >= 1 after the outage (replicas=$(replicas demo hello))" [ "$(replicas demo hello)" -ge 1 ]
check "wakegate holds the Lease again" wait_for 20 is_leader

# ---------------------------------------------------------------------------------------------
STEP=8-rbac
sa_audit > "$WORK/sa-audit.jsonl"
n=$(grep -c . "$WORK/sa-audit.jsonl")
# a 403 between an API server's process start and its /readyz is its RBAC cache not loaded yet
forbidden=$(jq -c 'select(.responseStatus.code == 403)' "$WORK/sa-audit.jsonl" |
  while read -r e; do
    t=$(echo "$e" | jq -r .requestReceivedTimestamp)
    in=$(awk -v t="$t" '$1 <= t && t <= $2 { print "yes"; exit }' "$WORK/apiserver-starts.txt")
    echo "$e" | jq -c --arg s "${in:-no}" '{at: .requestReceivedTimestamp, verb, uri: .requestURI, decision: .annotations["authorization.k8s.io/decision"], during_apiserver_startup: ($s == "yes")}'
  done)
n403=$(echo "$forbidden" | grep -c .)
n403_ready=$(echo "$forbidden" | grep -c '"during_apiserver_startup":false')
info "403 answers to $SA_USER: $n403 in all$( [ "$n403" -gt 0 ] && echo ": $(echo "$forbidden" | paste -sd' ')")"
info "API server start-up windows (process start, /readyz ok): $(paste -sd',' "$WORK/apiserver-starts.txt")"
if [ "$n" -gt 0 ] && [ "$n403_ready" = 0 ]; then
  pass "0 of $n requests by $SA_USER answered 403 while the API server was ready ($((n403 - n403_ready)) during its start-up, before its RBAC cache had loaded)"
else
  fail "$n403_ready of $n requests by $SA_USER answered 403 while the API server was ready"
fi
info "API calls by $SA_USER (count verb group/resource[/subresource] scope -> codes; open/cut: a watch still open or cut by the SIGKILL):"
jq -r '[.verb, ((.objectRef.apiGroup // "core") + "/" + .objectRef.resource + (if .objectRef.subresource then "/" + .objectRef.subresource else "" end)),
        (if .objectRef.namespace then "ns" else "cluster" end), (.responseStatus.code // "open/cut" | tostring)] | @tsv' "$WORK/sa-audit.jsonl" |
  sort | uniq -c | awk '{ k = $2 " " $3 " " $4; c[k] += $1; codes[k] = codes[k] " " $5 "x" $1 } END { for (k in c) printf "  %5d %s ->%s\n", c[k], k, codes[k] }' | sort -k2
allowed='^(list|watch) core/services cluster$|^(list|watch) discovery.k8s.io/endpointslices cluster$|^(get|list|watch) apps/deployments (ns|cluster)$|^(get|patch) apps/deployments/scale ns$|^(create|patch) events.k8s.io/events ns$|^(get|create|update) coordination.k8s.io/leases ns$'
extra=$(jq -r '.verb + " " + (.objectRef.apiGroup // "core") + "/" + .objectRef.resource + (if .objectRef.subresource then "/" + .objectRef.subresource else "" end) + " " + (if .objectRef.namespace then "ns" else "cluster" end)' "$WORK/sa-audit.jsonl" | sort -u | grep -Ev "$allowed")
check "every call is one README lists for wakegate${extra:+ (not: $extra)}" [ -z "$extra" ]

# ---------------------------------------------------------------------------------------------
STEP=end
errs=$(wg_lines "cannot record the Event" | grep -c .)
check "no \"cannot record the Event\" in wakegate's log ($errs)" [ "$errs" = 0 ]
info "wakegate JSON log lines with the key \"target\" twice: $(grep -c '"target":"[^"]*".*"target":"' "$WG_LOG") (e.g. $(grep -m1 '"target":"[^"]*".*"target":"' "$WG_LOG"))"
errors=$(jq -cR 'fromjson? | select(.level == "ERROR")' "$WG_LOG" | grep -c .)
info "wakegate log: $(grep -c . "$WG_LOG") lines, $errors ERROR, $(jq -cR 'fromjson? | select(.level == "WARN")' "$WG_LOG" | grep -c .) WARN"
kill -0 "$WAKEGATE_PID" 2>/dev/null && pass "wakegate still running" || fail "wakegate exited: $(tail -3 "$WG_LOG")"
echo "== $PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
