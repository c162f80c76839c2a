#!/usr/bin/env bash
# Start `lcfs daemon` in the background on its plugin socket, unless the
# process named by its pid file is alive, and wait until it listens.
#
# Usage: scripts/start-daemon.sh [DAEMON OPTION...]   (as root)
# Environment: LCFS_PREFIX (virtual environment, default /opt/lcfs),
# LCFS_LOG (daemon log, default /var/log/lcfs.log), LCFS_SOCKET (plugin
# socket, default /run/docker/plugins/lcfs.sock), LCFS_PID_FILE (default
# the socket path with .pid in place of .sock).
set -euo pipefail

prefix=${LCFS_PREFIX:-/opt/lcfs}
log=${LCFS_LOG:-/var/log/lcfs.log}
socket=${LCFS_SOCKET:-/run/docker/plugins/lcfs.sock}
pid_file=${LCFS_PID_FILE:-${socket%.sock}.pid}

if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "lcfs daemon already running with pid $(cat "$pid_file"); log in $log"
    exit 0
fi

# A daemon killed with SIGKILL leaves its pid file and socket behind. The
# new daemon removes the stale socket, then writes its pid, then listens,
# so only a live pid other than the stale one and a socket at once mean
# that it is ready.
stale_pid=$(cat "$pid_file" 2>/dev/null || true)
mkdir -p "$(dirname "$socket")" "$(dirname "$log")"
# Without job control, which a script does not have, the background job is
# no process group leader, so setsid does not fork and $! is the daemon.
setsid "$prefix/bin/lcfs" daemon --socket "$socket" --pid-file "$pid_file" "$@" \
    </dev/null >>"$log" 2>&1 &
daemon=$!

for _ in $(seq 1 150); do
    pid=$(cat "$pid_file" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$pid" != "$stale_pid" ] && kill -0 "$pid" 2>/dev/null \
        && [ -S "$socket" ]; then
        echo "lcfs daemon started with pid $pid; socket $socket, log $log"
        exit 0
    fi
    if [ -n "$daemon" ] && ! kill -0 "$daemon" 2>/dev/null; then
        status=0
        wait "$daemon" || status=$?
        # Status 0 means that setsid forked after all, so the daemon may
        # still start: keep waiting for its pid file.
        if [ "$status" -ne 0 ]; then
            echo "start-daemon.sh: lcfs daemon exited with status $status before it" \
                "listened on $socket. Fix the error at the end of $log and run the" \
                "script again:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        daemon=
    fi
    sleep 0.2
done
echo "start-daemon.sh: lcfs daemon did not listen on $socket within 30 s;" \
    "fix the error at the end of $log and run the script again:" >&2
tail -n 20 "$log" >&2
exit 1
