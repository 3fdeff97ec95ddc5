# Sourced by the example launch scripts: run the grape-rewards reward service for the length of a training run.
#
#   grape_start_service --index DIR --port 8000 ...   start `grape-rewards serve` in the background, stop it on exit
#   grape_wait_ready URL SECONDS                        wait until URL/ready answers 200 (fails if the service died)
#
# The service is stopped with SIGTERM (it drains: accepted requests are answered) when the calling script exits,
# whether training finished, failed or was interrupted.

GRAPE_SERVICE_PID=""

grape_stop_service() {
    if [[ -n "${GRAPE_SERVICE_PID}" ]] && kill -0 "${GRAPE_SERVICE_PID}" 2>/dev/null; then
        echo "[grape] stopping the reward service (pid ${GRAPE_SERVICE_PID})" >&2
        kill -TERM "${GRAPE_SERVICE_PID}" 2>/dev/null || true
        wait "${GRAPE_SERVICE_PID}" 2>/dev/null || true
    fi
    GRAPE_SERVICE_PID=""
}

grape_start_service() {
    echo "[grape] grape-rewards serve $*" >&2
    grape-rewards serve "$@" &
    GRAPE_SERVICE_PID=$!
    trap grape_stop_service EXIT
    trap 'exit 130' INT TERM
}

grape_wait_ready() {
    local url="$1" timeout="${2:-600}"
    python - "${url}" "${timeout}" "${GRAPE_SERVICE_PID}" <<'PY'
import os, sys, time, urllib.error, urllib.request

url, timeout, pid = sys.argv[1].rstrip("/") + "/ready", float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if pid:
        try:
            os.kill(int(pid), 0)
            with open(f"/proc/{pid}/stat") as f:  # an exited, not yet reaped child is a zombie ("Z")
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except ProcessLookupError:
            alive = False
        except OSError:
            alive = True
        if not alive:
            sys.exit("[grape] the reward service exited before it was ready (see its log above)")
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                print(f"[grape] reward service ready: {url}", file=sys.stderr)
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(1)
sys.exit(f"[grape] the reward service at {url} was not ready after {timeout:.0f} s")
PY
}
