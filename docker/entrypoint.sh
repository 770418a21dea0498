#!/usr/bin/env bash
# Pod start: render env into configs (render_config.py), prepare folders and the VNC password
# file, then hand over to supervisord. Nothing here refuses to start: RunPod restarts a container
# whose entrypoint exits, forever and billing; a bad setting is named in the pod log and replaced.
set -Eeuo pipefail
umask 077

APP=/opt/segmentation-machine
VENV=/opt/venv/bin
CONF=/etc/segmentation-machine
KEPT=/workspace/.segmentation-machine  # root's, on the volume: what a resumed pod must find again
CREDENTIALS=$KEPT/credentials
DESKTOP_HOME=/home/sm

# Whatever fails before supervisord takes over (a volume that refuses chown, a full disk), the pod agent still
# runs, with the pod's own environment: the pod bills until something ends it, and the agent is what does.
# -E: a failure inside a function or subshell (as_sm) counts too; the trap acts once, in the script itself.
agent_alone() {
    [ "$BASHPID" = "$$" ] || exit 1
    echo "segmentation-machine: preparing the pod failed (entrypoint.sh line $1); only its agent runs, which ends" \
         "the pod at its idle timeout, budget or lifetime. The pod log above says what failed." >&2
    exec "$VENV/python" -m SegmentationMachineLib.cloud.podagent --alone
}
trap 'agent_alone $LINENO' ERR

install -d -m 0755 /workspace  # before the renderer makes it as a parent of its credentials, private
/usr/bin/python3 "$APP/docker/render_config.py"

credential() { sed -n "s/^$1=//p" "$CREDENTIALS"; }
# The desktop user owns its home and may have planted links there: everything under it is done as that
# user, who cannot reach further than before, never as root. A clean environment: no secrets of ours.
as_sm() { (cd / && runuser -u sm -- env -i HOME="$DESKTOP_HOME" PATH=/usr/bin:/bin LANG=C.UTF-8 "$@"); }

# Folders on the volume. /workspace belongs to root, so nobody else can swap these for links.
install -d -m 0755 -o nni -g nni /workspace/nninteractive
# The agent's running time over all starts (its budget and lifetime are totals) and its notice for the desktop.
install -d -m 0755 -o smagent -g smagent /workspace/.pod-agent
install -d -m 0755 /run/segmentation-machine /var/log/segmentation-machine

if grep -q '^\[program:vnc\]' "$CONF/supervisord.conf"; then  # desktop mode
    # The inbox (uploads), exports, scenes (Slicer's default place to save), the upload page's part files and
    # the inbox's journal (outside the inbox, same volume): all of it outlives the container disk, which a
    # stop or restart wipes, so a resumed pod keeps the user's work and delivers no series twice.
    install -d -m 0755 -o sm -g sm /workspace/inbox /workspace/exports /workspace/scenes
    install -d -m 0700 -o sm -g sm /workspace/.uploads /workspace/.inbox-state
    # --wipe-at-end: the agent asks here, the wiper (the desktop user, who owns the uploads) answers there; on the
    # container disk, so no request outlives a stop (SegmentationMachineLib/cloud/wipe.py).
    install -d -m 0755 -o smagent -g smagent /run/segmentation-machine/agent
    install -d -m 0755 -o sm -g sm /run/segmentation-machine/wiper
    as_sm mkdir -p -m 0700 "$DESKTOP_HOME/.vnc"
    as_sm mkdir -p "$DESKTOP_HOME/SegmentationMachine"
    # The module exports to ~/SegmentationMachine/Exports: keep them on the volume, downloadable.
    [ -e "$DESKTOP_HOME/SegmentationMachine/Exports" ] || as_sm ln -sfn /workspace/exports "$DESKTOP_HOME/SegmentationMachine/Exports"
    # The desktop's settings too: OrcaSlicer's printer, filament and process profiles, and Slicer's DICOM database
    # (at Slicer's default place). Settings and an index, which alone do not make the pod agent stop a pod rather
    # than terminate it; the copies of files that database keeps (an unpacked zip's series) do.
    install -d -m 0700 -o sm -g sm /workspace/.desktop
    for kept in .config/OrcaSlicer Documents/SlicerDICOMDatabase; do
        as_sm mkdir -p "/workspace/.desktop/${kept##*/}" "$DESKTOP_HOME/${kept%/*}"
        [ -e "$DESKTOP_HOME/$kept" ] || as_sm ln -sfn "/workspace/.desktop/${kept##*/}" "$DESKTOP_HOME/$kept"
    done
    # TurboVNC's obfuscated password file (VNC uses the first 8 characters), written by the user.
    if ! credential SM_VNC_PASSWORD | as_sm /opt/TurboVNC/bin/vncpasswd -f | as_sm tee "$DESKTOP_HOME/.vnc/passwd" >/dev/null; then
        echo "segmentation-machine: could not write the VNC password file ($DESKTOP_HOME/.vnc/passwd); the desktop refuses every login." >&2
    fi
fi

if [ -f "$CONF/sshd_config" ]; then
    # Host keys: made at the pod's first start and kept on the volume, so that after a resume ssh does not warn
    # that the host's identification changed.
    install -d -m 0700 "$KEPT/ssh"
    cp -p "$KEPT"/ssh/ssh_host_* /etc/ssh/ 2>/dev/null || true
    ssh-keygen -A >/dev/null
    cp -p /etc/ssh/ssh_host_* "$KEPT/ssh/"
    install -d -m 0755 /run/sshd
fi

# supervisord passes its environment to every child: start it with a clean one; each program
# gets exactly its own variables from supervisord.conf.
trap - ERR
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    /usr/bin/supervisord -n -c "$CONF/supervisord.conf"
