#!/bin/sh
# Written by trellis-testkit (src/service.rs) next to a service the kit
# shares between test binaries (PostgreSQL, SeaweedFS), and rewritten when
# the kit's copy changes.
#
# Every test process that uses service NAME holds a shared flock on
# DIR/NAME-users.lock for its lifetime and touches the file when it starts.
# Once nobody has held that lock for IDLE seconds, the watchdog stops the
# service's process PID with SIGNAL, holding DIR/NAME-service.lock (the lock
# the kit starts the service under), and removes DIR/NAME.pid.
#
#   sh service-watchdog.sh DIR NAME PID IDLE POLL SIGNAL
set -u

dir=$1
name=$2
pid=$3
idle=$4
poll=$5
signal=$6
users=$dir/$name-users.lock

say() {
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) watchdog[$$] $name: $*"
}

# Whether process $1 runs (a zombie does not).
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    [ "$(sed 's/^.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}

done_watching() {
    if [ "$(cat "$dir/$name-watchdog.pid" 2>/dev/null)" = $$ ]; then
        rm -f "$dir/$name-watchdog.pid"
    fi
}

say "watching $pid: it stops after ${idle} s without users"
busy=$(date +%s)
while alive "$pid"; do
    sleep "$poll"
    now=$(date +%s)
    if ! flock -n -x "$users" true; then
        busy=$now
        continue
    fi
    touched=$(stat -c %Y "$users" 2>/dev/null || echo 0)
    [ "$touched" -gt "$busy" ] && busy=$touched
    [ $((now - busy)) -ge "$idle" ] || continue
    exec 8>"$dir/$name-service.lock" 9>>"$users"
    flock -x 8
    if flock -n -x 9 && [ "$(cat "$dir/$name.pid" 2>/dev/null)" = "$pid" ]; then
        say "no users for ${idle} s: stopping $pid with SIG$signal"
        kill "-$signal" "$pid" 2>/dev/null
        n=0
        while alive "$pid"; do
            n=$((n + 1))
            if [ "$n" -eq 300 ]; then
                say "$pid is still there 30 s later; killing it"
                kill -KILL "$pid" 2>/dev/null
            fi
            sleep 0.1
        done
        rm -f "$dir/$name.pid"
        say "stopped"
        done_watching
        exit 0
    fi
    exec 9>&- 8>&-
    busy=$now
done
say "$pid ended on its own"
done_watching
