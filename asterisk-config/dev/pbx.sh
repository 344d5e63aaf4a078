#!/usr/bin/env bash
# The local dev PBX: Asterisk 22 from Debian's sid suite in a debootstrapped
# root under .cache/, with the operator configs plus the dev overlay.
#
#   pbx.sh provision   build the root once (about 65 s; reused afterwards)
#   pbx.sh up          provision if needed, install configs, start Asterisk, and
#                      return once an AMI login succeeds
#   pbx.sh down        stop the Asterisk this script started, unmount /proc
#   pbx.sh status      exit 0 when running and logged in to AMI
#   pbx.sh kill        SIGKILL the running Asterisk (fault tests); `up` restarts it
#
# Each command but provision takes a node: a (the default: AMI 127.0.0.1:5038, SIP
# 5060) or b (AMI 5039, SIP 5061), a second Asterisk from the same root with its own
# config, run, spool, log and database directories (make cluster-up). Both trunk to
# the far end on 127.0.0.1:5070 with the same AMI user and secret.
#
# Every command is idempotent. Needs root (debootstrap, chroot, mount).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${OTP_PBX_CACHE:-$repo/.cache}
root=$cache/asterisk-root

node=${2:-a}
case "$node" in
    a) suffix=""; ami_port=5038; sip_port=5060 ;;
    b) suffix="-b"; ami_port=5039; sip_port=5061 ;;
    *) echo "pbx: unknown node '$node' (a or b)" >&2; exit 2 ;;
esac
pidfile=$cache/asterisk$suffix.pid
logfile=$cache/asterisk$suffix.log
etc_dir=/etc/asterisk$suffix  # inside the root
# Node a uses Asterisk's own defaults; node b names its asterisk.conf.
asterisk=(/usr/sbin/asterisk)
if [ -n "$suffix" ]; then asterisk+=(-C "$etc_dir/asterisk.conf"); fi

ami_host=127.0.0.1
ami_user=otp-gateway
ami_secret=otp-dev-secret
# Asterisk is ready ~1.3 s after start on this kind of machine; a cold disk
# cache or a loaded CI box can take much longer.
start_timeout_s=60
stop_timeout_s=15

die() { echo "pbx: $*" >&2; exit 1; }
say() { echo "pbx: $*"; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot and mount need it); try: sudo make $1"
}

# The PID of our Asterisk if it is alive, else nothing.
running_pid() {
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && [ -d "/proc/$pid" ] \
        && [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ]; then
        echo "$pid"
    fi
}

ami_login() {
    # Exit 0 when a login as the gateway's AMI user succeeds.
    python3 - "$ami_host" "$ami_port" "$ami_user" "$ami_secret" <<'PY'
import socket, sys
host, port, user, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        buf = b""
        s.sendall(f"Action: Login\r\nUsername: {user}\r\nSecret: {secret}\r\n\r\n".encode())
        # The banner comes first; the login's reply ends with a blank line.
        while b"Response:" not in buf or not buf.split(b"Response:", 1)[1].count(b"\r\n\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        s.sendall(b"Action: Logoff\r\n\r\n")
        sys.exit(0 if b"Response: Success" in buf else 1)
except OSError:
    sys.exit(1)
PY
}

provision() {
    need_root pbx-up
    if [ -x "$root/usr/sbin/asterisk" ]; then
        return 0
    fi
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap (make test does it)"
    local tmp=$root.tmp
    if mountpoint -q "$tmp/proc" 2>/dev/null; then umount "$tmp/proc"; fi
    rm -rf "$tmp"
    mkdir -p "$cache"
    say "provisioning Asterisk from Debian sid into $root (about a minute, once)"
    if ! debootstrap --variant=minbase --include=asterisk sid "$tmp" >"$cache/debootstrap.log" 2>&1; then
        tail -n 20 "$cache/debootstrap.log" >&2
        die "provisioning failed (full log: $cache/debootstrap.log); the root was not kept"
    fi
    [ -x "$tmp/usr/sbin/asterisk" ] || die "provisioning finished without /usr/sbin/asterisk; see $cache/debootstrap.log"
    mv "$tmp" "$root"
    say "provisioned: $("$root/usr/sbin/asterisk" -V 2>/dev/null || chroot "$root" /usr/sbin/asterisk -V)"
}

install_configs() {
    local etc=$root/etc/asterisk
    install -m 0644 "$here/../extensions.conf" "$etc/extensions.conf"
    install -m 0644 "$here"/*.conf "$etc/"
    # Tests add sections of their own (tests/integration/test_dropins.py loads the
    # operator's drop-ins under other names) in $etc/otp-test/, and remove them after.
    # A #tryinclude of a missing file is a no-op.
    local name
    for name in pjsip manager extensions; do
        printf '\n#tryinclude "otp-test/%s.conf"\n' "$name" >>"$etc/$name.conf"
    done
    mkdir -p "$etc/otp-test" "$root"/var/{lib,log,spool,run}/asterisk
    install_prompts
    if [ -n "$suffix" ]; then install_node_configs; fi
}

# The voice call's prompts (asterisk-config/prompts.sh), made again when the script
# changes, copied inside the root: its sounds/en is a link to resolve there.
install_prompts() {
    local script=$here/../prompts.sh made=$cache/prompts
    if [ ! -f "$made/.made" ] || [ "$script" -nt "$made/.made" ]; then
        rm -rf "$made"
        bash "$script" "$made" >/dev/null || die "the voice prompts could not be made (asterisk-config/prompts.sh)"
        touch "$made/.made"
    fi
    rm -rf "$root/tmp/otp-prompts"
    cp -r "$made" "$root/tmp/otp-prompts"
    rm -f "$root/tmp/otp-prompts/.made"
    local locale
    for locale in "$made"/*/; do
        locale=$(basename "$locale")
        # The trailing slash follows a locale that is a link (Debian's sounds/en).
        chroot "$root" sh -c "mkdir -p /usr/share/asterisk/sounds/$locale && cp -r /tmp/otp-prompts/$locale/. /usr/share/asterisk/sounds/$locale/"
    done
    rm -rf "$root/tmp/otp-prompts"
}

# Node b: node a's configs with its own ports and directories.
install_node_configs() {
    local etc=$root/etc/asterisk node_etc=$root$etc_dir dir
    rm -rf "$node_etc"
    cp -a "$etc" "$node_etc"
    sed -i "s/^port = 5038$/port = $ami_port/" "$node_etc/manager.conf"
    sed -i "s/^bind = 127.0.0.1:5060$/bind = 127.0.0.1:$sip_port/" "$node_etc/pjsip.conf"
    grep -q "^port = $ami_port$" "$node_etc/manager.conf" || die "node $node: no AMI port to set in manager.conf"
    grep -q "^bind = 127.0.0.1:$sip_port$" "$node_etc/pjsip.conf" || die "node $node: no SIP bind to set in pjsip.conf"
    sed -i -e 's/^\[directories\](!)/[directories]/' \
        -e "s#^astetcdir => /etc/asterisk\$#astetcdir => $etc_dir#" \
        "$node_etc/asterisk.conf"
    for dir in cache lib spool run log; do
        mkdir -p "$root/var/$dir/asterisk$suffix"
    done
    sed -i -e "s#^astcachedir => /var/cache/asterisk\$#astcachedir => /var/cache/asterisk$suffix#" \
        -e "s#^astdbdir => /var/lib/asterisk\$#astdbdir => /var/lib/asterisk$suffix#" \
        -e "s#^astspooldir => /var/spool/asterisk\$#astspooldir => /var/spool/asterisk$suffix#" \
        -e "s#^astrundir => /var/run/asterisk\$#astrundir => /var/run/asterisk$suffix#" \
        -e "s#^astlogdir => /var/log/asterisk\$#astlogdir => /var/log/asterisk$suffix#" \
        "$node_etc/asterisk.conf"
    grep -q "^astrundir => /var/run/asterisk$suffix$" "$node_etc/asterisk.conf" \
        || die "node $node: asterisk.conf has no astrundir to set"
}

up() {
    need_root pbx-up
    provision
    install_configs
    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        chroot "$root" "${asterisk[@]}" -rx "core reload" >/dev/null 2>&1 || true
    else
        if ! mountpoint -q "$root/proc"; then mount -t proc proc "$root/proc"; fi
        # setsid: the PBX outlives this shell and gets no terminal signals.
        setsid chroot "$root" "${asterisk[@]}" -f -n >"$logfile" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$pidfile"
    fi
    local deadline=$((SECONDS + start_timeout_s))
    until ami_login; do
        if [ ! -d "/proc/$pid" ]; then
            tail -n 20 "$logfile" "$root/var/log/asterisk$suffix/messages.log" >&2 2>/dev/null || true
            rm -f "$pidfile"
            down_mounts
            die "Asterisk exited during start; see $logfile"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "no AMI login on $ami_host:$ami_port after ${start_timeout_s}s (Asterisk PID $pid, log $logfile)"
        fi
        sleep 0.2
    done
    # AMI answers before every module has loaded; until Asterisk is fully booted,
    # PJSIP drops SIP responses, so a first call would lose its 180 and never CANCEL.
    if ! timeout "$start_timeout_s" chroot "$root" "${asterisk[@]}" -rx "core waitfullybooted" >/dev/null; then
        die "Asterisk $pid did not finish booting in ${start_timeout_s}s; see $logfile"
    fi
    say "up: node $node, Asterisk PID $pid, AMI $ami_host:$ami_port (user $ami_user), SIP 127.0.0.1:$sip_port, trunk far end 127.0.0.1:5070"
}

# /proc is shared by both nodes: unmounted once neither runs.
down_mounts() {
    local other
    for other in "$cache"/asterisk.pid "$cache"/asterisk-b.pid; do
        [ "$other" = "$pidfile" ] && continue
        if [ -f "$other" ] && [ -d "/proc/$(cat "$other")" ]; then return 0; fi
    done
    if mountpoint -q "$root/proc" 2>/dev/null; then umount "$root/proc"; fi
}

down() {
    need_root pbx-down
    local pid
    pid=$(running_pid)
    if [ -n "$pid" ]; then
        kill -TERM "$pid"
        local deadline=$((SECONDS + stop_timeout_s))
        while [ -d "/proc/$pid" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if [ -d "/proc/$pid" ]; then
            say "Asterisk $pid did not stop in ${stop_timeout_s}s; killing it"
            kill -KILL "$pid"
            while [ -d "/proc/$pid" ]; do sleep 0.1; done
        fi
        say "stopped node $node, Asterisk $pid"
    fi
    rm -f "$pidfile"
    down_mounts
}

kill_pbx() {
    need_root pbx-kill
    local pid
    pid=$(running_pid)
    [ -n "$pid" ] || { say "not running"; return 0; }
    kill -KILL "$pid"
    while [ -d "/proc/$pid" ]; do sleep 0.05; done
    rm -f "$pidfile"
    say "killed Asterisk $pid"
}

status() {
    local pid
    pid=$(running_pid)
    [ -n "$pid" ] || { say "not running"; exit 1; }
    ami_login || { say "Asterisk $pid is running but AMI login fails"; exit 1; }
    say "running: Asterisk PID $pid, AMI login ok"
}

case "${1:-}" in
    provision) provision ;;
    up) up ;;
    down) down ;;
    status) status ;;
    kill) kill_pbx ;;
    *) echo "usage: $0 provision|up|down|status|kill [a|b]" >&2; exit 2 ;;
esac
