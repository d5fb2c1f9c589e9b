#!/bin/sh
# Written by trellis-testkit (src/docker.rs) next to the kit's Docker
# daemon, and rewritten when the kit's copy changes.
#
# Every test process that uses the daemon holds a shared flock on
# DIR/docker-users.lock for its lifetime and touches the file when it
# starts. `watch` stops the daemon once nobody has held that lock for IDLE
# seconds and removes what dockerd leaves behind on the host: its bridges
# (docker0, br-<id>), its iptables rules and chains, the FORWARD policy it
# changed, mounts under its directories. `prepare` removes what an earlier
# daemon that died left behind, before a new one starts, and notes the
# FORWARD policy to restore. Both act only under DIR/docker-service.lock,
# the lock the kit starts the daemon under.
#
#   sh docker-watchdog.sh prepare DIR          (the caller holds the lock)
#   sh docker-watchdog.sh watch DIR PID IDLE POLL
#
# The kit writes the watchdog's pid into DIR/docker-watchdog.pid; the
# watchdog removes the file when it ends.
set -u

mode=$1
dir=$2
users=$dir/docker-users.lock
policy_file=$dir/docker-forward-policy

say() {
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) watchdog[$$]: $*"
}

# Whether process $1 runs. A zombie does not: a detached daemon's parent
# may be gone, and whoever inherits it may never reap it.
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    [ "$(sed 's/^.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}

# Pids of the dockerd processes that run, except $1.
daemons_but() {
    for p in /proc/[0-9]*; do
        candidate=${p#/proc/}
        [ "$candidate" != "$1" ] && [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] &&
            alive "$candidate" && echo "$candidate"
    done
}

# SIGTERM, and SIGKILL after 30 s. dockerd stops its containers (each
# gets its stop timeout) and its containerd before it exits.
stop_daemon() {
    kill -TERM "$1" 2>/dev/null || return 0
    n=0
    while alive "$1"; do
        n=$((n + 1))
        if [ "$n" -eq 300 ]; then
            say "dockerd $1 is still there 30 s after SIGTERM; killing it"
            kill -KILL "$1" 2>/dev/null
        fi
        sleep 0.1
    done
}

# The containerd and shims of a daemon that died: they name its exec root
# on their command line.
kill_strays() {
    for p in /proc/[0-9]*; do
        case "$(cat "$p/comm" 2>/dev/null)" in
        containerd*)
            if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$dir/docker-exec/"; then
                say "killing ${p#/proc/} ($(cat "$p/comm")), left by a daemon that died"
                kill -KILL "${p#/proc/}" 2>/dev/null
            fi
            ;;
        esac
    done
}

# Unmounts what is still mounted under the daemon's directories (network
# namespaces, overlays of containers that never stopped), deepest first.
unmount_all() {
    awk -v prefix="$dir/docker-" 'index($2, prefix) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mount; do
            umount "$mount" 2>/dev/null || umount -l "$mount" || say "cannot unmount $mount"
        done
}

# The bridges dockerd set up: docker0, and a br-<id> per bridge network
# (each has a RETURN rule in the nat table's DOCKER chain).
bridges() {
    echo docker0
    iptables -t nat -S DOCKER 2>/dev/null |
        sed -n 's/^-A DOCKER -i \(br-[0-9a-f]*\) -j RETURN$/\1/p'
}

# Removes the rules of the built-in chains that jump to a DOCKER chain or
# name one of the bridges $1, then the DOCKER chains themselves.
remove_rules() {
    names=$(echo "$1" | tr -s ' \n' '|')
    pattern="-j DOCKER|(-i|-o) (${names%|})( |\$)"
    for table in filter nat; do
        iptables -t "$table" -S 2>/dev/null | grep '^-A ' | grep -v '^-A DOCKER' |
            grep -E -- "$pattern" | while read -r rule; do
                # shellcheck disable=SC2086 # the rule's words, as iptables printed them
                iptables -t "$table" -D ${rule#-A } || say "cannot remove rule $rule ($table)"
            done
        chains=$(iptables -t "$table" -S 2>/dev/null | sed -n 's/^-N \(DOCKER[A-Z0-9-]*\)$/\1/p')
        for chain in $chains; do
            iptables -t "$table" -F "$chain"
        done
        for chain in $chains; do
            iptables -t "$table" -X "$chain" || say "cannot remove chain $chain ($table)"
        done
    done
}

remove_bridges() {
    for bridge in $1; do
        if ip link show "$bridge" >/dev/null 2>&1; then
            ip link delete "$bridge" || say "cannot remove bridge $bridge"
        fi
    done
}

# dockerd sets the FORWARD policy to DROP when it turns on IP forwarding
# itself. (IP forwarding stays on: Podman's networks turn it on as well,
# and may be in use.)
restore_policy() {
    [ -s "$policy_file" ] || return 0
    iptables -P FORWARD "$(cat "$policy_file")" && rm -f "$policy_file"
}

# Removes what a daemon that is no longer running left behind.
cleanup() {
    kill_strays
    unmount_all
    others=$(daemons_but "")
    if [ -n "$others" ]; then
        # They share docker0 and the DOCKER chains.
        say "another dockerd runs ($others): leaving docker0 and the DOCKER iptables rules alone"
    else
        found=$(bridges)
        remove_rules "$found"
        remove_bridges "$found"
        restore_policy
    fi
    # containerd puts its shims' sockets under /run/containerd/s whatever
    # its state directory; the directories go if they are empty.
    rmdir /run/containerd/s /run/containerd 2>/dev/null
    rm -f "$dir/docker.sock" "$dir/docker.pid"
}

prepare() {
    cleanup
    iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p' >"$policy_file"
}

watch() {
    daemon=$1
    idle=$2
    poll=$3
    say "watching dockerd $daemon: it stops after ${idle} s without users"
    busy=$(date +%s)
    while alive "$daemon"; do
        sleep "$poll"
        now=$(date +%s)
        if ! flock -n -x "$users" true; then
            busy=$now
            continue
        fi
        touched=$(stat -c %Y "$users" 2>/dev/null || echo 0)
        [ "$touched" -gt "$busy" ] && busy=$touched
        [ $((now - busy)) -ge "$idle" ] || continue
        # Idle. Stop it holding both locks, so that no test process starts
        # a daemon or begins to use this one meanwhile; one that waits for
        # them finds no daemon afterwards and starts a new one.
        exec 8>"$dir/docker-service.lock" 9>>"$users"
        flock -x 8
        if flock -n -x 9 && [ "$(cat "$dir/docker.pid" 2>/dev/null)" = "$daemon" ]; then
            say "no users for ${idle} s: stopping dockerd $daemon"
            stop_daemon "$daemon"
            cleanup
            say "dockerd $daemon stopped, and what it left behind removed"
            done_watching
            exit 0
        fi
        exec 9>&- 8>&-
        busy=$now
    done
    # It ended without us. Clean up after it, unless a new daemon already
    # took its place (the kit prepared for that one itself).
    exec 8>"$dir/docker-service.lock"
    flock -x 8
    now_daemon=$(cat "$dir/docker.pid" 2>/dev/null || true)
    if [ -z "$now_daemon" ] || [ "$now_daemon" = "$daemon" ]; then
        say "dockerd $daemon ended on its own; removing what it left behind"
        cleanup
    fi
    done_watching
}

done_watching() {
    if [ "$(cat "$dir/docker-watchdog.pid" 2>/dev/null)" = $$ ]; then
        rm -f "$dir/docker-watchdog.pid"
    fi
}

case "$mode" in
prepare) prepare ;;
watch) watch "$3" "$4" "$5" ;;
*)
    echo "usage: $0 prepare DIR | watch DIR PID IDLE POLL" >&2
    exit 2
    ;;
esac
