#!/usr/bin/env python3
"""Renders the pod's environment into service configuration files (stdlib only).

Called by entrypoint.sh on every start, before supervisord. `--root` prefixes every path
written, so tests render into a temporary folder; paths *inside* the files stay absolute.

- Secrets: taken from the environment, else from the credentials file of an earlier start,
  else generated. Only newly generated ones are printed, so each appears in the pod log once.
- supervisord.conf: the programs of the mode (server | desktop), each given only the
  variables it needs, because supervisord passes its own environment to every child.
- SSH: a key-only sshd config and authorized_keys, only when RunPod's PUBLIC_KEY is set.
"""

import argparse
import configparser
import io
import os
import re
import secrets
import sys
from pathlib import Path

SECRETS = ("SM_NNI_API_KEY", "SM_VNC_PASSWORD", "SM_FILES_PASSWORD", "SM_HEARTBEAT_TOKEN")
CREDENTIALS = "/root/.segmentation-machine/credentials"
CONF_DIR = "/etc/segmentation-machine"
SOCKET = "/run/segmentation-machine/supervisor.sock"
LOG_DIR = "/var/log/segmentation-machine"
VENV = "/opt/venv/bin"
APP = "/opt/segmentation-machine"
WORKSPACE = "/workspace"
DESKTOP_USER, DESKTOP_HOME = "sm", "/home/sm"
PATH = f"{VENV}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Letters, digits and -_.+= only: safe in supervisor's environment syntax, in the credentials file
# and on the filebrowser command line. 12 characters is File Browser's minimum password length.
SECRET_PATTERN = re.compile(r"[A-Za-z0-9._+=-]{12,256}")
MODES = ("server", "desktop")


class ConfigError(Exception):
    """A setting the pod cannot start with; the message says which and why."""


def root_path(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def write_private(path: Path, text: str, mode: int = 0o600):
    """Writes a file that is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT


def read_credentials(path: Path) -> dict:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs if key in SECRETS}


def resolve_secrets(env, root: Path):
    """(all secrets, the names generated now); stores them in the root-only credentials file."""
    stored = read_credentials(root_path(root, CREDENTIALS))
    values, generated = {}, []
    for name in SECRETS:
        value = env.get(name) or stored.get(name)
        if value is None:
            value = secrets.token_urlsafe(24)  # 192 bits
            generated.append(name)
        if not SECRET_PATTERN.fullmatch(value):
            raise ConfigError(f"{name} must be 12 to 256 characters of letters, digits and -_.+= "
                              "(leave it unset and the pod generates one).")
        values[name] = value
    write_private(root_path(root, CREDENTIALS), "".join(f"{k}={v}\n" for k, v in values.items()))
    return values, generated


def supervisor_env(pairs: dict) -> str:
    """supervisor's KEY="value",... syntax; refuses what that syntax cannot carry."""
    items = []
    for key, value in pairs.items():
        if any(c in value for c in "\"'%\\\n\r"):
            raise ConfigError(f"{key} contains a quote, backslash, % or line break, which the pod cannot pass on.")
        items.append(f'{key}="{value}"')
    return ",".join(items)


def passthrough(env, names=(), prefixes=()):
    return {k: v for k, v in sorted(env.items()) if k in names or k.startswith(tuple(prefixes))}


def programs(env, mode: str, values: dict) -> dict:
    """Each program's command, user and environment; the desktop ones only in desktop mode."""
    gpu = passthrough(env, ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"))
    agent_port = env.get("SM_AGENT_PORT") or "8001"
    result = {
        "server": {
            # --device cuda: on a host whose driver cannot run our torch the server fails (and the start
            # times out and is terminated) instead of quietly running on the CPU while the GPU bills.
            "command": f"{VENV}/segmentation-machine server --host 0.0.0.0 --port 8000 --device cuda",
            "user": "nni",
            # The upstream server keeps its model manifest and weights under NNINTERACTIVE_MODEL_DIR
            # (Hugging Face downloads included): on the volume, so they are downloaded once.
            "env": {"HOME": "/var/lib/nni", "SM_NNI_API_KEY": values["SM_NNI_API_KEY"],
                    "NNINTERACTIVE_MODEL_DIR": f"{WORKSPACE}/nninteractive",
                    "HF_HOME": f"{WORKSPACE}/nninteractive/huggingface", **gpu},
            "stopwaitsecs": "30",
        },
        "agent": {
            "command": f"{VENV}/python -m SegmentationMachineLib.cloud.podagent",
            "user": "smagent",
            "log": "/dev/stdout",  # the pod log in RunPod's console: why the pod ended is seen there
            "env": {"HOME": "/var/lib/smagent", "SM_MODE": mode,
                    "SM_HEARTBEAT_TOKEN": values["SM_HEARTBEAT_TOKEN"],
                    "SM_IDLE_TIMEOUT_S": env.get("SM_IDLE_TIMEOUT_S") or "900", "SM_AGENT_PORT": agent_port,
                    **passthrough(env, ("SM_MAX_LIFETIME_S", "SM_BUDGET_USD", "SM_WARNING_S", "SM_AGENT_POLL_S"),
                                  ("RUNPOD_",))},
        },
    }
    if mode == "desktop":
        desktop = {"HOME": DESKTOP_HOME, "USER": DESKTOP_USER, "LOGNAME": DESKTOP_USER}
        result.update({
            # Xvnc listens on localhost only: the browser reaches it through websockify, and
            # VNC password authentication is the only security type offered.
            "vnc": {
                "command": ("/opt/TurboVNC/bin/vncserver :1 -fg -localhost -securitytypes VNC "
                            f"-rfbauth {DESKTOP_HOME}/.vnc/passwd -geometry 1920x1080 -depth 24 "
                            f"-xstartup {APP}/docker/desktop/xstartup"),
                "user": DESKTOP_USER, "env": desktop, "priority": "10",
            },
            "novnc": {
                "command": f"{VENV}/websockify --web /opt/novnc 0.0.0.0:6080 127.0.0.1:5901",
                "user": DESKTOP_USER, "env": desktop, "priority": "20",
            },
            "filebrowser": {
                "command": (f"/usr/local/bin/filebrowser -d /var/lib/segmentation-machine/filebrowser.db "
                            f"-a 0.0.0.0 -p 8080 -r {WORKSPACE}"),
                "user": DESKTOP_USER, "env": desktop,
            },
            "slicer": {
                "command": f"{APP}/docker/desktop/sm-slicer",
                "user": DESKTOP_USER, "priority": "30",
                "env": {**desktop, "DISPLAY": ":1", "SM_INBOX": f"{WORKSPACE}/inbox",
                        "SM_NNI_URL": "http://127.0.0.1:8000", "SM_NNI_API_KEY": values["SM_NNI_API_KEY"], **gpu},
            },
        })
    if env.get("PUBLIC_KEY"):
        result["sshd"] = {"command": f"/usr/sbin/sshd -D -e -f {CONF_DIR}/sshd_config", "user": "root", "env": {}}
    return result


def supervisord_conf(env, mode: str, values: dict) -> str:
    conf = configparser.ConfigParser(interpolation=None)
    # A unix socket only root can open, and no TCP control port: nothing listens on the network.
    conf["unix_http_server"] = {"file": SOCKET, "chmod": "0700", "chown": "root:root"}
    conf["supervisord"] = {"nodaemon": "true", "user": "root", "logfile": "/dev/stdout",
                           "logfile_maxbytes": "0", "pidfile": "/run/segmentation-machine/supervisord.pid",
                           "childlogdir": LOG_DIR}
    conf["rpcinterface:supervisor"] = {
        "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"}
    conf["supervisorctl"] = {"serverurl": f"unix://{SOCKET}"}
    for name, program in programs(env, mode, values).items():
        conf[f"program:{name}"] = {
            "command": program["command"],
            "user": program["user"],
            "environment": supervisor_env({"PATH": PATH, "LANG": "C.UTF-8", **program["env"]}),
            "priority": program.get("priority", "50"),
            "autostart": "true",
            "autorestart": "true",
            "startretries": "10",
            "stopasgroup": "true",
            "killasgroup": "true",
            "stopwaitsecs": program.get("stopwaitsecs", "10"),
            "redirect_stderr": "true",
            "stdout_logfile": program.get("log", f"{LOG_DIR}/{name}.log"),
            "stdout_logfile_maxbytes": "0" if "log" in program else "10MB",  # /dev/stdout cannot be rotated
            "stdout_logfile_backups": "0" if "log" in program else "3",
        }
    text = io.StringIO()
    conf.write(text)
    return f"; Written by render_config.py on every start (SM_MODE={mode}); edits are lost.\n" + text.getvalue()


SSHD_CONFIG = """\
# Written by render_config.py because PUBLIC_KEY is set: keys only, never passwords.
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UsePAM no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
"""
KEY_LINE = re.compile(r"(ssh-|ecdsa-|sk-)\S+ \S+( .*)?")


def render_ssh(env, root: Path):
    config, keys = root_path(root, f"{CONF_DIR}/sshd_config"), root_path(root, "/root/.ssh/authorized_keys")
    public_key = env.get("PUBLIC_KEY", "").strip()
    if not public_key:
        config.unlink(missing_ok=True)  # a pod restarted without a key runs no sshd
        return
    lines = [line.strip() for line in public_key.splitlines() if line.strip()]
    if not all(KEY_LINE.fullmatch(line) for line in lines):
        raise ConfigError("PUBLIC_KEY must hold OpenSSH public keys (ssh-ed25519 AAAA... comment), one per line.")
    write_private(config, SSHD_CONFIG, 0o644)
    write_private(keys, "\n".join(lines) + "\n")


SLICER_INI = f"""\
[Modules]
AdditionalPaths={APP}/SegmentationMachine
"""


def render_slicer_settings(root: Path):
    """Registers the module folder with Slicer once; later the user's own settings win."""
    ini = root_path(root, f"{DESKTOP_HOME}/.config/slicer.org/Slicer.ini")
    if not ini.exists():
        ini.parent.mkdir(parents=True, exist_ok=True)
        ini.write_text(SLICER_INI)


def render(env, root: Path, out=sys.stdout):
    mode = env.get("SM_MODE") or "server"
    if mode not in MODES:
        raise ConfigError(f"SM_MODE must be server or desktop, not {mode!r}.")
    values, generated = resolve_secrets(env, root)
    write_private(root_path(root, f"{CONF_DIR}/supervisord.conf"), supervisord_conf(env, mode, values))
    render_ssh(env, root)
    if mode == "desktop":
        render_slicer_settings(root)
    if generated:
        print(f"segmentation-machine: generated credentials (printed this once; kept in {CREDENTIALS}):", file=out)
        for name in generated:
            print(f"  {name}={values[name]}", file=out)
    out.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="prefix of every path written (tests)")
    args = parser.parse_args(argv)
    try:
        render(os.environ, args.root)
    except ConfigError as error:
        print(f"segmentation-machine: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
