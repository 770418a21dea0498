#!/usr/bin/env bash
# Pod start: render env into configs (render_config.py), prepare folders and the two
# password stores that need their own tools, then hand over to supervisord.
set -euo pipefail
umask 077

APP=/opt/segmentation-machine
CONF=/etc/segmentation-machine
CREDENTIALS=/root/.segmentation-machine/credentials
export SM_MODE="${SM_MODE:-server}"

/usr/bin/python3 "$APP/docker/render_config.py"

credential() { sed -n "s/^$1=//p" "$CREDENTIALS"; }
as_sm() { (cd / && runuser -u sm -- env HOME=/home/sm "$@"); }

# Shared folders on the volume: the inbox File Browser uploads into, exports, the model cache.
install -d -m 0755 /workspace
install -d -m 0755 -o nni -g nni /workspace/nninteractive
install -d -m 0755 /run/segmentation-machine /var/log/segmentation-machine
if [ -d /opt/nninteractive/models ]; then
    # Weights baked in at build time: link them into the cache instead of downloading.
    install -d -m 0755 -o nni -g nni /workspace/nninteractive/models
    [ -e /workspace/nninteractive/models.json ] || install -m 0644 -o nni -g nni \
        /opt/nninteractive/models.json /workspace/nninteractive/models.json  # the manifest, for offline starts
    for model in /opt/nninteractive/models/*; do
        [ -e "/workspace/nninteractive/models/${model##*/}" ] || ln -s "$model" "/workspace/nninteractive/models/"
    done
fi

if [ "$SM_MODE" = desktop ]; then
    install -d -m 0755 -o sm -g sm /workspace/inbox /workspace/exports /home/sm/.vnc /home/sm/SegmentationMachine
    # The module exports to ~/SegmentationMachine/Exports: keep them on the volume, downloadable.
    [ -e /home/sm/SegmentationMachine/Exports ] || ln -s /workspace/exports /home/sm/SegmentationMachine/Exports
    chown -R sm:sm /home/sm

    # TurboVNC's obfuscated password file; VNC authentication uses the first 8 characters.
    credential SM_VNC_PASSWORD | /opt/TurboVNC/bin/vncpasswd -f > /home/sm/.vnc/passwd
    chown sm:sm /home/sm/.vnc/passwd
    chmod 0600 /home/sm/.vnc/passwd

    # File Browser keeps its users in a database: create user "sm" once (no admin, no shell
    # commands, no public share links), and set its password from SM_FILES_PASSWORD every start.
    db=/var/lib/segmentation-machine/filebrowser.db
    install -d -m 0700 -o sm -g sm /var/lib/segmentation-machine
    if [ ! -f "$db" ]; then
        as_sm filebrowser -d "$db" config init --auth.method=json >/dev/null
        as_sm filebrowser -d "$db" users add sm "$(credential SM_FILES_PASSWORD)" \
            --perm.admin=false --perm.execute=false --perm.share=false >/dev/null
    else
        as_sm filebrowser -d "$db" users update sm --password "$(credential SM_FILES_PASSWORD)" >/dev/null
    fi
fi

if [ -f "$CONF/sshd_config" ]; then
    ssh-keygen -A >/dev/null  # host keys, generated per pod
    install -d -m 0755 /run/sshd
fi

# supervisord passes its environment to every child: start it with a clean one; each program
# gets exactly its own variables from supervisord.conf.
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    /usr/bin/supervisord -n -c "$CONF/supervisord.conf"
